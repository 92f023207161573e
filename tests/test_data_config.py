"""The `data:` schema: NeMo's knob names, and errors that name the field to fix."""

import pytest

from salm.data.config import DataConfig, SharSourceSpec
from salm.errors import SALMConfigError


def test_shar_path_accepts_path_list_and_weighted_pairs() -> None:
    assert DataConfig(shar_path="a", batch_size=2).sources == [SharSourceSpec("a", 1.0)]
    assert DataConfig(shar_path=["a", "b"], batch_size=2).sources == [
        SharSourceSpec("a"),
        SharSourceSpec("b"),
    ]
    weighted = DataConfig(shar_path=[["a", 3], ["s3://bucket/b", 0.5]], batch_size=2)
    assert weighted.sources == [SharSourceSpec("a", 3.0), SharSourceSpec("s3://bucket/b", 0.5)]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"batch_size": 2}, "data.shar_path"),
        ({"shar_path": [["a", 0]], "batch_size": 2}, "data.shar_path"),
        ({"shar_path": "a", "batch_size": 2, "bogus_knob": 1}, "data.bogus_knob"),
        ({"shar_path": "a"}, "data.batch_size"),
        ({"shar_path": "a", "bucket_batch_size": [4, 2]}, "data.bucket_duration_bins"),
        (
            {"shar_path": "a", "bucket_duration_bins": [2.0, 4.0], "bucket_batch_size": [4]},
            "data.bucket_batch_size",
        ),
        (
            {"shar_path": "a", "bucket_duration_bins": [4.0, 2.0], "batch_size": 2},
            "data.bucket_duration_bins",
        ),
        (
            {"shar_path": "a", "use_multimodal_sampling": True, "batch_tokens": 100},
            "data.token_equivalent_duration",
        ),
        ({"shar_path": "a", "batch_size": 2, "max_tokens": 10}, "data.token_equivalent_duration"),
        ({"shar_path": "a", "batch_size": 2, "min_duration": 5.0, "max_duration": 1.0}, "data.min_duration"),
        ({"shar_path": "a", "batch_size": 0}, "data.batch_size"),
    ],
)
def test_invalid_settings_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(SALMConfigError, match=field.replace(".", r"\.")):
        DataConfig.from_dict(values)


def test_bucket_knobs_turn_bucketing_on_like_nemo() -> None:
    cfg = DataConfig.from_dict(
        {"shar_path": "a", "bucket_duration_bins": [2.0, 4.0], "bucket_batch_size": [8, 4]}
    )
    assert cfg.use_bucketing


def test_from_dict_accepts_an_omegaconf_node() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.create({"shar_path": [["a", 2.0]], "batch_duration": 30.0, "use_bucketing": True})
    cfg = DataConfig.from_dict(node)
    assert cfg.sources == [SharSourceSpec("a", 2.0)] and cfg.batch_duration == 30.0


def test_errors_name_the_recipe_section_the_keys_live_in() -> None:
    with pytest.raises(SALMConfigError, match=r"`data\.train_ds\.batch_size` must be > 0"):
        DataConfig.from_dict({"shar_path": "a", "batch_size": 0}, section="data.train_ds")
    with pytest.raises(SALMConfigError, match=r"`data\.validation_ds\.datasets\.dev\.bogus`"):
        DataConfig.from_dict({"shar_path": "a", "bogus": 1}, section="data.validation_ds.datasets.dev")
