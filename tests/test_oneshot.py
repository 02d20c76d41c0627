"""tp_ollama.oneshot: the one-shot `generate` writes only the generated text, the text the engine in this
process gives (tp_ollama.completion), whether it runs here with its text side in a helper process or on two
ranks it starts; timings on stderr when asked; a layout the model cannot take refused before any rank starts.
The command line around it: test_cli.py; the ranks' side: test_oneshot_ranks.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import make_hf_model, save_hf, save_tiny_tokenizer
from tp_ollama.completion import load, stream_text
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.errors import ConfigError
from tp_ollama.launch import Cluster
from tp_ollama.oneshot import Prompting, generate_in_process, generate_on_ranks, sampling_options
from tp_ollama.text.prompt import prompt_tokens

PROMPT = "hello world"
GREEDY = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("tiny-llama"))
    save_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> str:
    """The greedy text of PROMPT from the engine in this process."""
    loaded = load(str(tiny_dir), "float32")
    try:
        return "".join(stream_text(loaded, prompt_tokens(loaded.tokenizer, PROMPT), GREEDY))
    finally:
        loaded.engine.close()


def request(tiny_dir: Path, verbose: bool = False) -> Prompting:
    return Prompting(str(tiny_dir), PROMPT, chat=False, system=None, options=GREEDY, dtype="float32", verbose=verbose)


def test_sampling_flags_become_the_sampling_options_and_the_rest_stay_beside_them():
    options = sampling_options(temperature=0.0, top_k=5, seed=3, num_predict=16, num_ctx=512, stop=["\n", "###"])
    assert options == GenerationOptions(
        sampling=SamplingOptions(temperature=0.0, top_k=5, seed=3), num_predict=16, num_ctx=512, stop=("\n", "###")
    )
    assert sampling_options(stop=None).stop == ()


def test_in_process_only_the_generated_text_is_written_and_the_timings_when_asked(
    tiny_dir: Path, reference: str, capfd: pytest.CaptureFixture[str]
):
    assert reference and PROMPT not in reference
    generate_in_process(request(tiny_dir))
    plain = capfd.readouterr()
    assert plain.out == reference
    assert "eval count:" not in plain.err
    generate_in_process(request(tiny_dir, verbose=True))
    verbose = capfd.readouterr()
    assert verbose.out == reference
    assert "load duration:" in verbose.err and "eval count:" in verbose.err


def test_two_ranks_write_the_same_text(tiny_dir: Path, reference: str, capfd: pytest.CaptureFixture[str]):
    generate_on_ranks(request(tiny_dir), Cluster(nproc_per_node=2), "3,1", "auto", debug=False)
    assert capfd.readouterr().out == reference


def test_a_layout_the_model_cannot_take_is_refused_before_any_rank_starts(tiny_dir: Path):
    with pytest.raises(ConfigError, match="tensor-parallel degree 5 exceeds the model's 4 attention heads"):
        generate_on_ranks(request(tiny_dir), Cluster(nproc_per_node=5), None, "auto", debug=False)
    with pytest.raises(ConfigError, match="--tp-weights 'fast' is invalid"):
        generate_on_ranks(request(tiny_dir), Cluster(nproc_per_node=2), "fast", "auto", debug=False)
