from pathlib import Path

import pytest

from components.config import ModelConfig
from components.model.base_model import SMOLLM2, resolve_base_model, weights_sha256


def test_unknown_base_model_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        resolve_base_model(ModelConfig(base_model="no-such-model"))


def test_local_folder_is_used_as_is(tiny_base) -> None:
    ref = resolve_base_model(ModelConfig(base_model=tiny_base.path))
    assert ref.path == tiny_base.path and ref.sha256 == tiny_base.sha256


def test_weights_hash_is_cached_and_tracks_content(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights-1")
    first = weights_sha256(tmp_path)
    assert weights_sha256(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"weights-2 (changed)")
    assert weights_sha256(tmp_path) != first


@pytest.mark.slow
@pytest.mark.e2e
def test_packaged_smollm2_converts_to_an_ordinary_folder_and_answers() -> None:
    """The default base model: real SmolLM2-135M-Instruct from the package, no hub."""
    from transformers import AutoModelForCausalLM

    from components.model.generation import generate_chat, load_for_inference

    ref = resolve_base_model(ModelConfig(base_model=SMOLLM2))
    folder = Path(ref.path)
    assert (folder / "model.safetensors").stat().st_size > 400e6
    assert resolve_base_model(ModelConfig(base_model=SMOLLM2)).sha256 == ref.sha256
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers reads it
    assert model.config.model_type == "llama"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6

    model, tokenizer = load_for_inference(ref.path)
    answer = generate_chat(
        model,
        tokenizer,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        max_new_tokens=16,
    )[0]
    assert "Paris" in answer.text
    assert answer.completion_tokens > 0
