"""serve/config.yaml is a Ray Serve config file, its overrides work, and `salm serve` resolves it."""

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest
import torch
import yaml
from conftest import free_port

from salm.cli import main
from serve.config_file import DEFAULT_CONFIG, load_serve_config, validate_serve_config


def deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def test_config_file_validates_against_ray_serves_schema() -> None:
    schema = validate_serve_config(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    assert schema.applications[0].import_path == "serve.app:build_app"


def test_transcriber_can_fill_a_batch_and_sheds_overload() -> None:
    transcriber = deployments(yaml.safe_load(DEFAULT_CONFIG.read_text()))["Transcriber"]
    # Serve's default max_ongoing_requests (5) would cap every batch at 5 requests.
    assert transcriber["max_ongoing_requests"] >= 16
    assert transcriber["max_queued_requests"] > 0
    assert transcriber["backpressure_config"]["retry_after_s"] > 0
    assert (
        transcriber["autoscaling_config"]["max_replicas"] > transcriber["autoscaling_config"]["min_replicas"]
    )


def test_overrides_reach_args_deployments_and_http_options(tmp_path: Path) -> None:
    config = load_serve_config(
        model=tmp_path,
        overrides=[
            "args.max_audio_s=120",
            "Transcriber.user_config.max_batch_audio_s=320",
            "Ingress.autoscaling_config.max_replicas=8",
            "http_options.port=8123",
        ],
    )
    app = config["applications"][0]
    assert app["args"]["model"] == str(tmp_path.resolve()) and app["args"]["max_audio_s"] == 120
    assert deployments(config)["Transcriber"]["user_config"]["max_batch_audio_s"] == 320
    assert deployments(config)["Ingress"]["autoscaling_config"]["max_replicas"] == 8
    assert config["http_options"]["port"] == 8123


def test_unknown_section_and_invalid_value_are_refused() -> None:
    with pytest.raises(ValueError, match="not one of args, Ingress, Transcriber"):
        load_serve_config(overrides=["Transcribr.max_ongoing_requests=8"])
    with pytest.raises(pydantic.ValidationError, match="max_ongoing_requests"):
        load_serve_config(overrides=["Transcriber.max_ongoing_requests=-1"])


def test_salm_serve_dry_run_prints_a_config_serve_run_accepts(tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path), "args.max_chunk_s=20", "--port", "8111", "--dry-run"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    validate_serve_config(config)
    assert config["http_options"]["port"] == 8111
    assert config["applications"][0]["args"]["model"] == str(tmp_path.resolve())
    assert config["applications"][0]["args"]["max_chunk_s"] == 20


@pytest.mark.parametrize("options", [[], ["--python-proxy"]], ids=["throughput-mode", "python-proxy"])
def test_salm_serve_refuses_to_start_a_cluster_whose_haproxy_ports_are_taken(
    tmp_path: Path, monkeypatch, capsys, options: list[str]
) -> None:
    """An HAProxy left by a killed Serve holds its fixed ports; the new cluster's would crash deep in
    Ray after the model loaded. `salm serve` says so first, and how to move the ports."""
    import socket
    import subprocess

    from serve.throughput_mode import THROUGHPUT_MODE_ENV

    for name in THROUGHPUT_MODE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("serve.cli.starts_its_own_cluster", lambda: True)
    calls = []
    monkeypatch.setattr(
        "serve.cli.subprocess.run",
        lambda command, env, check: calls.append(command) or subprocess.CompletedProcess(command, 0),
    )
    with socket.socket() as holder:  # what a leftover HAProxy does to its stats port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(taken))
        monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
        if options:  # Serve's Python proxy starts no HAProxy: nothing to check
            assert main(["serve", str(tmp_path), *options]) == 0
            assert len(calls) == 1
            return
        with pytest.raises(SystemExit) as stopped:
            main(["serve", str(tmp_path)])
    assert stopped.value.code == 2
    assert calls == []  # `serve run` never started
    err = capsys.readouterr().err
    assert f"error: port {taken} (RAY_SERVE_HAPROXY_STATS_PORT" in err
    assert "RAY_SERVE_HAPROXY_SOCKET_PATH" in err and "--python-proxy" in err


def test_a_haproxy_port_that_is_not_a_number_is_named() -> None:
    from serve.throughput_mode import haproxy_port_conflict

    environment = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": "84o4"}
    assert haproxy_port_conflict(environment) == "RAY_SERVE_HAPROXY_STATS_PORT='84o4' is not a port number"
    assert haproxy_port_conflict({"RAY_SERVE_HAPROXY_STATS_PORT": "84o4"}) is None  # no HAProxy, no check


@pytest.mark.parametrize(
    ("options", "user_env", "expected_ha_proxy"),
    [([], {}, "1"), ([], {"RAY_SERVE_ENABLE_HA_PROXY": "0"}, "0"), (["--python-proxy"], {}, None)],
    ids=["default", "user-turned-off", "python-proxy"],
)
def test_salm_serve_starts_its_cluster_in_serves_throughput_mode(
    tmp_path: Path, monkeypatch, capsys, options: list[str], user_env: dict, expected_ha_proxy: str | None
) -> None:
    import subprocess

    from serve.throughput_mode import HAPROXY_PORTS, THROUGHPUT_MODE_ENV

    for name in THROUGHPUT_MODE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in user_env.items():
        monkeypatch.setenv(name, value)
    for name in HAPROXY_PORTS:  # free ones: a Serve of another test may hold HAProxy's defaults
        monkeypatch.setenv(name, str(free_port()))
    calls = []

    def serve_run(command, env, check):  # `serve run` itself would start a cluster and block
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr("serve.cli.subprocess.run", serve_run)
    assert main(["serve", str(tmp_path), *options]) == 0
    ((command, env),) = calls
    assert command[-2] == "run" and Path(command[-1]).suffix == ".yaml"
    assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == expected_ha_proxy
    if options:  # --python-proxy: none of the mode's variables reach the cluster
        assert not set(THROUGHPUT_MODE_ENV) & set(env)
    else:
        others = {k: v for k, v in THROUGHPUT_MODE_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"}
        assert {k: env[k] for k in others} == others
    err = capsys.readouterr().err
    assert {"1": "throughput mode (HAProxy) on", "0": "off (RAY_SERVE_ENABLE_HA_PROXY", None: "Python proxy"}[
        expected_ha_proxy
    ] in err


def bare_replica(config, model: SimpleNamespace):
    """A Transcriber without a Ray actor: the class's own methods, around a stand-in model."""
    from serve.transcriber import Transcriber

    replica = object.__new__(Transcriber.func_or_class)
    replica.config, replica.model = config, model
    return replica


def warnings_logged(call: Callable[[], None]) -> list[str]:
    """The warnings the replicas' logger (``ray.serve``) receives while ``call()`` runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        call()
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


def test_salm_serve_names_a_missing_model(capsys) -> None:
    assert main(["serve", "/nonexistent/model", "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("user_config", "message"),
    [
        ({"max_batch_audio_s": 0}, "`user_config.max_batch_audio_s` must be >= 1"),
        ({"max_new_tokens": 0}, "`user_config.max_new_tokens` must be >= 1"),
        ({"compile_decoding": "yes"}, "`user_config.compile_decoding` must be true or false"),
        ({"compile_encoder": 1}, "`user_config.compile_encoder` must be true or false"),
        ({"compile_prefill": "on"}, "`user_config.compile_prefill` must be true or false"),
        ({"warm_up_clip_s": 10}, "`user_config.warm_up_clip_s` must be a list"),
        ({"warm_up_clip_s": [10, 0]}, "each > 0"),
        ({"warm_up_clip_s": [700]}, r"<= max_batch_audio_s \(640\)"),
    ],
)
def test_bad_transcriber_user_config_is_refused_with_the_field(user_config: dict, message: str) -> None:
    from serve.transcriber import BatchingConfig

    with pytest.raises(ValueError, match=message):
        BatchingConfig(**user_config)
    assert BatchingConfig().compile_decoding is False  # off unless asked: it compiles for minutes
    assert BatchingConfig().compile_encoder is False
    assert BatchingConfig().compile_prefill is False


@pytest.mark.parametrize("switch", ["compile_decoding", "compile_prefill"])
def test_a_replica_whose_decoding_compile_fails_serves_eagerly_and_says_why(switch: str) -> None:
    """``compile_decoding`` and ``compile_prefill`` are on in serve/config.yaml; an image without
    Triton's C compiler must not turn that into a replica that fails every request."""
    from serve.transcriber import BatchingConfig

    switched_on = []

    def transcribe(audios, max_new_tokens):
        switched_on.append(getattr(model, switch))
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    model = SimpleNamespace(
        sampling_rate=16000, compile_decoding=False, compile_prefill=False, transcribe=transcribe
    )
    replica = bare_replica(BatchingConfig(**{switch: True}), model)
    warnings = warnings_logged(getattr(replica, f"_{switch}_now"))
    assert switched_on == [True]  # the warm-up call ran with the part turned on
    assert getattr(replica.model, switch) is False
    assert len(warnings) == 1
    assert "Failed to find C compiler" in warnings[0]
    assert f"`Transcriber.user_config.{switch}: false`" in warnings[0]


def test_a_gpu_replica_compiles_the_step_then_the_prefill_each_in_its_own_warm_up() -> None:
    """``reconfigure`` on a GPU: the decoding step's warm-up runs with the prefill still eager (else
    its compile and its timing would include the prefill's), then the prefill compiles; turning
    ``compile_prefill`` off runs it eagerly again, and a CPU replica never turns it on."""
    from serve.transcriber import BatchingConfig

    warm_ups = []

    def transcribe(audios, max_new_tokens):
        warm_ups.append((model.compile_decoding, model.compile_prefill))
        return [""] * len(audios)

    model = SimpleNamespace(
        device=torch.device("cuda"),
        sampling_rate=16000,
        compile_decoding=False,
        compile_prefill=False,
        transcribe=transcribe,
        perception=SimpleNamespace(encoder=SimpleNamespace(layers=[]), set_encoder_layout=lambda **_: None),
    )
    replica = bare_replica(BatchingConfig(), model)
    replica.default_prompt = "Transcribe the following: <|audio|>"
    replica.transcribe_batch = SimpleNamespace(
        set_max_batch_size=lambda size: None, set_batch_wait_timeout_s=lambda seconds: None
    )
    replica.reconfigure({"compile_decoding": True, "compile_prefill": True})
    assert warm_ups == [(True, False), (True, True)]
    assert model.compile_prefill is True
    replica.reconfigure({"compile_decoding": True, "compile_prefill": True})  # nothing new to compile
    assert len(warm_ups) == 2
    replica.reconfigure({"compile_decoding": True, "compile_prefill": False})
    assert model.compile_prefill is False and len(warm_ups) == 2
    model.device = torch.device("cpu")
    replica.reconfigure({"compile_decoding": True, "compile_prefill": True})
    assert model.compile_prefill is False and len(warm_ups) == 2


def test_a_replica_compiles_its_encoder_before_requests_and_no_request_recompiles(
    tiny_salm, speech_clips
) -> None:
    """``compile_encoder``: the replica's two warm-up calls (1 and 2 clips) must leave graphs that
    every later batch size and clip length reuses (a recompile inside a request costs seconds on a
    GPU), with the eager encoder's transcripts; turning it off runs the layers eagerly again."""
    from torch._dynamo.utils import counters

    from salm.model.compile import encoder_layers, is_compiled
    from serve.transcriber import BatchingConfig

    model = copy.deepcopy(tiny_salm)  # compiled in place; the shared fixture stays eager
    prompt = f"Transcribe the following: {model.audio_locator_tag}"
    prompts = [[{"role": "user", "content": prompt, "audio": u.path}] for u in speech_clips[:3]]
    eager = model.generate(prompts, max_new_tokens=6).token_ids
    replica = bare_replica(BatchingConfig(compile_encoder=True), model)
    replica.default_prompt = prompt
    torch._dynamo.reset()
    counters.clear()

    assert warnings_logged(lambda: replica._compile_encoder(True)) == []
    assert all(is_compiled(layer) for layer in encoder_layers(model))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert model.generate(prompts, max_new_tokens=6).token_ids == eager  # 3 clips of 3 new lengths
    assert model.generate(prompts[:1], max_new_tokens=6).token_ids == eager[:1]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled inside a request

    # a user_config change of keep_encoder_layout: the layers' graphs were built for the old layout
    model.perception.set_encoder_layout(channels_last_subsampling=False, pad_attention_keys_to=8)
    replica._compile_encoder(True)
    graphs = counters["stats"]["unique_graphs"]
    assert model.generate(prompts, max_new_tokens=6).token_ids == eager  # padded keys: same numbers
    assert counters["stats"]["unique_graphs"] == graphs  # recompiled at reconfigure, not in the request

    replica._compile_encoder(False)
    assert not any(is_compiled(layer) for layer in encoder_layers(model))


def test_a_replica_whose_encoder_compile_fails_runs_it_eagerly_and_says_why() -> None:
    from salm.model.compile import is_compiled
    from serve.transcriber import BatchingConfig

    def prepare_generation_inputs(prompts):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    model = SimpleNamespace(
        sampling_rate=16000,
        perception=SimpleNamespace(encoder=SimpleNamespace(layers=layers)),
        prepare_generation_inputs=prepare_generation_inputs,
    )
    replica = bare_replica(BatchingConfig(compile_encoder=True), model)
    replica.default_prompt = "Transcribe the following: <|audioplaceholder|>"
    warnings = warnings_logged(lambda: replica._compile_encoder(True))
    assert not any(is_compiled(layer) for layer in layers)
    assert len(warnings) == 1
    assert "Failed to find C compiler" in warnings[0]
    assert "compile_encoder: false" in warnings[0]


def test_config_files_user_config_is_a_valid_batching_config() -> None:
    from serve.transcriber import BatchingConfig

    user_config = deployments(yaml.safe_load(DEFAULT_CONFIG.read_text()))["Transcriber"]["user_config"]
    config = BatchingConfig(**user_config)
    assert config.warm_up_clip_s == (10.0, 20.0)
    assert (
        config.compile_encoder is True and config.compile_decoding is True and config.compile_prefill is True
    )


def test_warm_up_covers_every_padded_batch_size_a_batch_can_take() -> None:
    from serve.transcriber import warm_up_batch_sizes

    # 640 s holds 64 clips of 10 s; a compiled step never gets a 1-row decoder
    assert warm_up_batch_sizes(10, 640, 256, compile_step=True) == [2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert warm_up_batch_sizes(10, 640, 16, compile_step=False) == [1, 2, 4, 8, 12, 16]  # request limit
    assert warm_up_batch_sizes(30, 640, 256, compile_step=True)[-1] == 24  # 21 clips pad to 24 rows
    assert warm_up_batch_sizes(40, 20, 256, compile_step=False) == [1]  # a clip longer than the budget


class FakeDecoderCache:
    """The model's decoder bookkeeping as the warm-up reads it: a new row count is a capture, and
    beyond ``room`` decoders the oldest is dropped."""

    def __init__(self, room: int, fail_at_rows: int | None = None) -> None:
        self.room, self.fail_at_rows, self.held, self.misses, self.calls = room, fail_at_rows, [], 0, []

    def transcribe(self, audios: list, max_new_tokens: int) -> list[str]:
        self.calls.append((len(audios), {len(a) for a in audios}, max_new_tokens))
        if len(audios) == self.fail_at_rows:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        key = (len(audios), len(audios[0]))
        if key not in self.held:
            self.misses += 1
            self.held = [*self.held, key][-self.room :]
        return [""] * len(audios)

    def decoder_cache_stats(self) -> dict:
        return {"misses": self.misses, "entries": len(self.held), "bytes": len(self.held) * 10**9}


def warm_up(room: int, fail_at_rows: int | None = None, **config) -> tuple[FakeDecoderCache, list[str]]:
    from serve.transcriber import BatchingConfig

    cache = FakeDecoderCache(room, fail_at_rows)
    model = SimpleNamespace(
        sampling_rate=16000,
        compile_decoding=True,
        transcribe=cache.transcribe,
        decoder_cache_stats=cache.decoder_cache_stats,
    )
    replica = bare_replica(BatchingConfig(**config), model)
    return cache, warnings_logged(lambda: replica._warm_up_decoders(max_requests=64))


def test_a_replica_warms_up_every_clip_length_and_batch_size_before_requests() -> None:
    cache, warnings = warm_up(room=64, warm_up_clip_s=[10, 20], max_batch_audio_s=320, max_new_tokens=48)
    assert warnings == []
    assert cache.calls == [
        *[(rows, {160_000}, 48) for rows in [2, 4, 8, 12, 16, 24, 32]],  # 32 clips of 10 s fill 320 s
        *[(rows, {320_000}, 48) for rows in [2, 4, 8, 12, 16]],
    ]


def test_a_warm_up_that_outgrows_the_decoder_cache_stops_and_says_what_to_change() -> None:
    cache, warnings = warm_up(room=3, warm_up_clip_s=[10, 20], max_batch_audio_s=320)
    assert [rows for rows, _, _ in cache.calls] == [2, 4, 8, 12]  # the 4th capture dropped the 1st
    assert len(warnings) == 1
    assert "full at 12 rows of 10 s clips" in warnings[0]
    assert "warm_up_clip_s" in warnings[0]


def test_a_failing_warm_up_leaves_a_serving_replica_and_says_why() -> None:
    cache, warnings = warm_up(room=64, fail_at_rows=8, warm_up_clip_s=[10])
    assert [rows for rows, _, _ in cache.calls] == [2, 4, 8]
    assert len(warnings) == 1
    assert "CUDA out of memory" in warnings[0]
    assert "captured by the first request that needs them" in warnings[0]


def test_a_replica_serves_nchw_and_unpadded_keys_unless_told_to_keep_the_models_layout(
    tiny_model_cfg,
) -> None:
    """The canary recipe trains with channels-last subsampling and keys padded to 8; a replica turns
    both off before its warm-up (each new clip length cost 0.3-0.6 s with them on an H200)."""
    from salm.model import SALM
    from salm.model.encoder_layout import uses_channels_last_subsampling
    from salm.model.rel_shift import StridedRelPositionAttention
    from serve.transcriber import BatchingConfig

    tiny_model_cfg.perception.channels_last_subsampling = True
    tiny_model_cfg.perception.pad_attention_keys_to = 8
    model = SALM(tiny_model_cfg).eval()
    encoder = model.perception.encoder
    attentions = [m for m in encoder.modules() if isinstance(m, StridedRelPositionAttention)]

    def layout() -> tuple[bool, set[int]]:
        return uses_channels_last_subsampling(encoder), {m.key_multiple for m in attentions}

    assert layout() == (True, {8})
    replica = bare_replica(BatchingConfig(), model)
    replica._apply_encoder_layout()
    assert layout() == (False, {0})
    replica.config = BatchingConfig(keep_encoder_layout=True)
    replica._apply_encoder_layout()
    assert layout() == (True, {8})
    with pytest.raises(ValueError, match="`user_config.keep_encoder_layout` must be true or false"):
        BatchingConfig(keep_encoder_layout="false")
