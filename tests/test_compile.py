"""Regional compilation (``salm.model.compile``) changes speed, not the model or its outputs."""

import copy

from torch._dynamo.utils import counters

from salm.model.compile import compile_repeated_layers, repeated_layers

PROMPT = "Transcribe the following: <|audioplaceholder|>"


def test_compiled_layers_keep_the_state_dict_and_the_transcripts(tiny_salm, speech_clips) -> None:
    model = copy.deepcopy(tiny_salm)  # compiling works in place; the shared fixture stays eager
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in speech_clips[:2]]
    eager = model.generate(prompts, max_new_tokens=8)
    keys = list(model.state_dict())

    compiled = compile_repeated_layers(model)

    encoder_layers = len(model.perception.encoder.layers)
    assert compiled == encoder_layers + model.llm.get_base_model().config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in repeated_layers(model))
    assert list(model.state_dict()) == keys  # checkpoints and .nemo files are unaffected
    graphs_before = counters["stats"]["unique_graphs"]
    again = model.generate(prompts, max_new_tokens=8)  # encoder compiled, LLM eager (force_eager)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled encoder layers ran
    assert again.token_ids == eager.token_ids
