import re
from pathlib import Path

import pytest
import yaml

from components.config import (
    PipelineConfig,
    ProfileError,
    available_profiles,
    load_profile,
    parse_profile,
    profile_path,
)


@pytest.mark.parametrize("name", ["tiny", "cpu-small", "gpu-qlora", "gpu-fsdp"])
def test_every_shipped_profile_parses(name: str) -> None:
    config = load_profile(name)
    assert isinstance(config, PipelineConfig)
    assert config.name == name
    for source in config.data.sources:
        assert (Path(__file__).parents[1] / source.path).exists(), source.path


def test_all_profile_files_are_covered() -> None:
    assert set(available_profiles()) >= {"tiny", "cpu-small", "gpu-qlora"}
    for name in available_profiles():
        load_profile(name)


def test_gpu_profile_is_qlora() -> None:
    config = load_profile("gpu-qlora")
    assert config.quantization.load_in_4bit
    assert config.quantization.quant_type == "nf4" and config.quantization.double_quant
    assert config.quantization.compute_dtype == "auto"
    assert config.train.gradient_checkpointing


def test_multi_gpu_profile_launches_with_the_shipped_fsdp_config() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_profile("gpu-fsdp")
    assert config.quantization == load_profile("gpu-qlora").quantization
    launch = load_config_from_file(config.train.accelerate_config)
    assert launch.distributed_type == "FSDP" and launch.num_processes >= 2
    assert launch.fsdp_config["fsdp_cpu_ram_efficient_loading"]  # shards load from the CPU


def test_a_missing_accelerate_config_is_named() -> None:
    with pytest.raises(ProfileError, match=r"train: .*accelerate_config: no file"):
        parse_profile(_raw(train__accelerate_config="deployments/accelerate/none.yaml"))


def test_profile_by_path_equals_by_name() -> None:
    assert load_profile("deployments/profiles/tiny.yaml") == load_profile("tiny")
    assert profile_path("tiny").name == "tiny.yaml"


def _raw(**changes) -> dict:
    raw = yaml.safe_load(profile_path("tiny").read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def test_unknown_key_is_rejected_with_its_name() -> None:
    with pytest.raises(ProfileError, match=r"train\.lr: unknown key"):
        parse_profile(_raw(train__lr=0.1))


def test_wrong_type_names_the_field() -> None:
    with pytest.raises(ProfileError, match=r"train\.batch_size"):
        parse_profile(_raw(train__batch_size="eight"))


def test_out_of_range_value_is_rejected() -> None:
    with pytest.raises(ProfileError, match=r"data\.validation_fraction"):
        parse_profile(_raw(data__validation_fraction=0.9))


def test_missing_profile_lists_shipped_ones() -> None:
    with pytest.raises(ProfileError, match=r"shipped profiles: .*cpu-small"):
        load_profile("cpu_small")


def test_invalid_yaml_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(bad)


def test_overrides_set_one_value_and_keep_the_rest() -> None:
    base = load_profile("tiny")
    changed = load_profile("tiny", ["serve.port=3100", "serve.batching=false", "lora.r=8"])
    assert (changed.serve.port, changed.serve.batching, changed.lora.r) == (3100, False, 8)
    assert changed.lora.alpha == base.lora.alpha and changed.train == base.train


def test_overrides_are_validated_like_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProfileError, match=r"serve\.prot: unknown key"):
        load_profile("tiny", ["serve.prot=3100"])
    with pytest.raises(ProfileError, match=r"serve\.port"):
        load_profile("tiny", ["serve.port=seventy"])
    with pytest.raises(ProfileError, match=r"expected section\.key=value"):
        load_profile("tiny", ["serve.port"])
    with pytest.raises(ProfileError, match="name is not a section"):
        load_profile("tiny", ["name.x=1"])


def test_environment_overrides_reach_every_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_SET", "serve.max_concurrency=2 'description=a b'")
    config = load_profile("tiny", ["serve.port=3200"])
    assert (config.serve.max_concurrency, config.serve.port) == (2, 3200)
    assert config.description == "a b"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("serve.models={general: base}", "must name a `champion`"),
        ("serve.models={champion: '@champion', canary: base}", "`canary` is the canary's"),
        ("serve.models={champion: '@champion', Big Model: base}", "'Big Model' is not a model"),
        ("serve.models={champion: 'hf:smollm'}", "serve.models.champion: 'hf:smollm' is not"),
        ("serve.routing.out_of_domain=general", "neither `scope_reply` nor a model"),
        ("serve.memory_budget_gb=0", "serve.memory_budget_gb"),
        ("serve.canary.share=1.5", "serve.canary.share"),
    ],
)
def test_served_models_are_checked_when_the_profile_loads(setting: str, message: str) -> None:
    with pytest.raises(ProfileError, match=re.escape(message)):
        load_profile("tiny", [setting])


def test_the_router_may_send_off_topic_questions_to_a_named_model() -> None:
    config = load_profile(
        "tiny",
        [
            "serve.models={champion: '@champion', general: base}",
            "serve.routing.out_of_domain=general",
        ],
    )
    assert config.serve.models == {"champion": "@champion", "general": "base"}
    assert load_profile("tiny").serve.models == {"champion": "@champion"}  # the default
