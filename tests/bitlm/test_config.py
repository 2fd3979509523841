"""bitlm.config: JSON round trips, presets, validation, dotted-key overrides and flatten."""

import dataclasses
import json

import pytest

from bitlm.config import (MODEL_PRESETS, DiffusionConfig, ExperimentConfig, ModelConfig, ParallelConfig, SafetyConfig, ScalingConfig,
                          TrainConfig, apply_overrides, flatten, from_dict, to_dict, to_json)

NON_DEFAULT_MODEL = ModelConfig(representation="byte", d_model=96, n_heads=3, n_layers=5, d_ff=200,
                                max_positions=300, dropout=0.25, parity=False, causal=False, reversible=True,
                                chunk_size=32, full_attn_logging=True, act=True,
                                act_threshold=0.5, local_d_ff=96, local_layers=2, n_streams=2,
                                norm="rms", mlp="swiglu", qk_norm=True, position_encoding="rotary",
                                zero_init_residual=True, zero_init_head=True, input_conv=3,
                                tree_shared_bits=True, byte_table=True, byte_softmax=True, known_parity=True)
NON_DEFAULT_TRAIN = TrainConfig(seed=7, batch_size=3, context_bytes=17, grad_accum_steps=2, max_steps=11,
                                max_seconds=12.5, lr=1.5e-4, min_lr_ratio=0.0, weight_decay=0.0, beta1=0.8,
                                beta2=0.99, warmup_steps=0, schedule="onecycle", grad_clip=0.0, precision="bf16",
                                compile=True, log_every=2, eval_every=5, eval_batches=1, checkpoint_every=4,
                                keep_checkpoints=1, lambda_k=0.1, lambda_c=0.2, lambda_s=0.3, drift_window=3,
                                drift_threshold=0.5, compress_prob=0.25, compress_warmup_steps=3,
                                compress_ramp_steps=5, qat=True, qat_group_size=64, decay_fraction=0.5,
                                optimizer="muon", muon_lr=0.01, muon_momentum=0.9)

ROUND_TRIP_CASES = [
    pytest.param(ModelConfig, ModelConfig(), id="model-default"),
    pytest.param(ModelConfig, NON_DEFAULT_MODEL, id="model-variant"),
    pytest.param(TrainConfig, TrainConfig(), id="train-default"),
    pytest.param(TrainConfig, NON_DEFAULT_TRAIN, id="train-variant"),
    pytest.param(ExperimentConfig, ExperimentConfig(), id="experiment-default"),
    pytest.param(ExperimentConfig, ExperimentConfig(model=NON_DEFAULT_MODEL, train=NON_DEFAULT_TRAIN),
                 id="experiment-variant"),
]



@pytest.mark.parametrize("cls, cfg", ROUND_TRIP_CASES)
def test_json_round_trip_is_exact(cls, cfg):
    assert from_dict(cls, json.loads(to_json(cfg))) == cfg


@pytest.mark.parametrize("cls, cfg", ROUND_TRIP_CASES)
def test_round_trip_preserves_field_types(cls, cfg):
    # == on dataclasses would accept 1 == 1.0 and True == 1; the rebuilt values must keep their types.
    rebuilt = from_dict(cls, json.loads(to_json(cfg)))
    assert {k: type(v) for k, v in flatten(rebuilt).items()} == {k: type(v) for k, v in flatten(cfg).items()}


def test_non_default_variants_differ_from_defaults_in_every_field():
    # Guards the round-trip cases above: each field of the variants really is exercised.
    for default, variant in ((ModelConfig(), NON_DEFAULT_MODEL), (TrainConfig(), NON_DEFAULT_TRAIN)):
        same = [f.name for f in dataclasses.fields(default)
                if getattr(default, f.name) == getattr(variant, f.name) and f.name != "arch"]
        assert same == []


def test_to_dict_nests_sections_as_plain_dicts():
    data = to_dict(ExperimentConfig())
    assert set(data) == {"model", "train", "diffusion", "scaling", "safety", "parallel"}
    assert data["model"]["n_layers"] == ModelConfig().n_layers
    assert data["train"]["lr"] == TrainConfig().lr
    json.dumps(data)  # JSON-safe


def test_from_dict_rejects_unknown_fields_and_lists_known_ones():
    data = to_dict(ModelConfig()) | {"n_layerz": 3}
    with pytest.raises(ValueError, match="n_layerz") as info:
        from_dict(ModelConfig, data)
    assert "n_layers" in str(info.value)


def test_from_dict_rejects_unknown_fields_in_a_nested_section():
    data = to_dict(ExperimentConfig())
    data["train"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match="learning_rate"):
        from_dict(ExperimentConfig, data)


def test_from_dict_fills_missing_fields_with_defaults():
    assert from_dict(ModelConfig, {"n_layers": 3}) == ModelConfig(n_layers=3)



@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_each_preset_builds_a_valid_config(name):
    cfg = ModelConfig.from_name(name)
    assert isinstance(cfg, ModelConfig)
    shape = {k: v for k, v in MODEL_PRESETS[name].items() if k != "context_bytes"}
    assert {k: getattr(cfg, k) for k in shape} == shape
    assert cfg.max_input_ids == MODEL_PRESETS[name]["context_bytes"] * cfg.bits_per_byte
    assert cfg.d_model % cfg.n_heads == 0


def test_presets_are_tiny_small_and_base_in_increasing_size():
    assert set(MODEL_PRESETS) == {"tiny", "small", "base"}
    sizes = [ModelConfig.from_name(n).d_model * ModelConfig.from_name(n).n_layers for n in ("tiny", "small", "base")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_from_name_applies_overrides():
    cfg = ModelConfig.from_name("tiny", n_layers=3, representation="byte")
    assert (cfg.n_layers, cfg.representation, cfg.d_model) == (3, "byte", MODEL_PRESETS["tiny"]["d_model"])


def test_from_name_overrides_are_validated():
    with pytest.raises(ValueError, match="model.dropout"):
        ModelConfig.from_name("tiny", dropout=1.5)


def test_unknown_preset_raises_listing_the_choices():
    with pytest.raises(ValueError, match="huge") as info:
        ModelConfig.from_name("huge")
    for name in ("tiny", "small", "base"):
        assert name in str(info.value)



@pytest.mark.parametrize("build, field", [
    pytest.param(lambda: ModelConfig(d_model=130, n_heads=4), "model.d_model", id="heads-not-dividing-d_model"),
    pytest.param(lambda: ModelConfig(dropout=1.0), "model.dropout", id="dropout-1"),
    pytest.param(lambda: ModelConfig(dropout=-0.1), "model.dropout", id="dropout-negative"),
    pytest.param(lambda: ModelConfig(chunk_size=0), "model.chunk_size", id="chunk_size-0"),
    pytest.param(lambda: ModelConfig(representation="word"), "model.representation", id="representation-word"),
    pytest.param(lambda: ModelConfig(arch="hier"), "model.arch", id="arch-unknown"),
    pytest.param(lambda: ModelConfig(n_layers=0), "model.n_layers", id="n_layers-0"),
    pytest.param(lambda: ModelConfig(act_threshold=0.0), "model.act_threshold", id="act_threshold-0"),
    pytest.param(lambda: TrainConfig(lr=0), "train.lr", id="lr-0"),
    pytest.param(lambda: TrainConfig(schedule="linear"), "train.schedule", id="schedule-linear"),
    pytest.param(lambda: TrainConfig(context_bytes=1), "train.context_bytes", id="context_bytes-1"),
    pytest.param(lambda: TrainConfig(max_seconds=0.0), "train.max_seconds", id="max_seconds-0"),
    pytest.param(lambda: TrainConfig(batch_size=0), "train.batch_size", id="batch_size-0"),
    pytest.param(lambda: TrainConfig(precision="fp16"), "train.precision", id="precision-fp16"),
    pytest.param(lambda: TrainConfig(min_lr_ratio=1.5), "train.min_lr_ratio", id="min_lr_ratio-1.5"),
])
def test_invalid_value_raises_value_error_naming_the_field(build, field):
    with pytest.raises(ValueError) as info:
        build()
    assert field in str(info.value)


def test_choice_error_lists_the_allowed_values():
    with pytest.raises(ValueError) as info:
        TrainConfig(schedule="linear")
    for allowed in ("cosine", "onecycle", "constant"):
        assert allowed in str(info.value)


def test_boundary_values_are_accepted():
    edges = {"dropout": 0.0, "chunk_size": 1, "act_threshold": 1.0, "n_heads": 1, "d_model": 1}
    model = ModelConfig(**edges)
    assert {k: getattr(model, k) for k in edges} == edges
    assert from_dict(ModelConfig, to_dict(model)) == model  # and they survive a round trip
    edges = {"context_bytes": 2, "min_lr_ratio": 1.0, "warmup_steps": 0, "grad_clip": 0.0, "checkpoint_every": 0}
    train = TrainConfig(**edges)
    assert {k: getattr(train, k) for k in edges} == edges
    assert from_dict(TrainConfig, to_dict(train)) == train
    for name, just_outside in (("dropout", 1.0), ("act_threshold", 0.0), ("chunk_size", 0)):
        with pytest.raises(ValueError, match=f"model.{name}"):
            ModelConfig(**{name: just_outside})
    for name, just_outside in (("context_bytes", 1), ("min_lr_ratio", 1.01), ("warmup_steps", -1)):
        with pytest.raises(ValueError, match=f"train.{name}"):
            TrainConfig(**{name: just_outside})


def test_old_keys_are_accepted_in_config_documents_and_overrides():
    old = {"model": {"checkpoint_activations": True, "n_layers": 3},
           "run": {"strategy": "fsdp", "n_microbatches": 2, "pipeline_schedule": "1f1b"}}
    assert from_dict(ExperimentConfig, {"run": old["run"]}).parallel.strategy == "fsdp"
    cfg = from_dict(ExperimentConfig, {"model": old["model"]})
    assert cfg.parallel.activation_checkpointing and cfg.model.n_layers == 3
    assert not hasattr(cfg.model, "checkpoint_activations")
    assert from_dict(ModelConfig, old["model"]).n_layers == 3  # a lone model section drops the execution option
    cfg = apply_overrides(ExperimentConfig(), ["run.strategy=pipeline", "run.n_microbatches=2",
                                               "run.pipeline_schedule=1f1b", "model.checkpoint_activations=true"])
    assert cfg.parallel == ParallelConfig(strategy="pipeline", n_microbatches=2, pipeline_schedule="1f1b",
                                          activation_checkpointing=True)


def test_derived_properties_follow_parity_and_representation():
    assert ModelConfig(parity=True).bits_per_byte == 9
    assert ModelConfig(parity=False).bits_per_byte == 8
    assert ModelConfig(parity=True, representation="bit").positions_per_byte == 9
    assert ModelConfig(parity=True, representation="byte").positions_per_byte == 1
    assert ModelConfig(d_model=128, n_heads=4).head_dim == 32




def test_override_sets_an_int():
    cfg = apply_overrides(ExperimentConfig(), ["model.n_layers=8"])
    assert cfg.model.n_layers == 8 and type(cfg.model.n_layers) is int


def test_override_int_accepts_integral_float_notation():
    cfg = apply_overrides(ExperimentConfig(), ["train.max_steps=1e3"])
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int


def test_override_rejects_a_fractional_value_for_an_int():
    with pytest.raises(ValueError, match="model.n_layers"):
        apply_overrides(ExperimentConfig(), ["model.n_layers=2.5"])


def test_override_sets_a_float():
    cfg = apply_overrides(ExperimentConfig(), ["train.lr=1e-3"])
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float


@pytest.mark.parametrize("text, expected", [("true", True), ("True", True), ("1", True), ("yes", True),
                                            ("on", True), ("false", False), ("0", False), ("off", False)])
def test_override_sets_a_bool(text, expected):
    base = ExperimentConfig(model=ModelConfig(reversible=not expected))
    cfg = apply_overrides(base, [f"model.reversible={text}"])
    assert cfg.model.reversible is expected


def test_override_rejects_a_non_boolean_for_a_bool_field():
    with pytest.raises(ValueError, match="model.reversible") as info:
        apply_overrides(ExperimentConfig(), ["model.reversible=maybe"])
    assert "boolean" in str(info.value)


@pytest.mark.parametrize("text", ["none", "None", "null"])
def test_override_none_clears_an_optional_field(text):
    base = ExperimentConfig(model=ModelConfig(chunk_size=64))
    assert apply_overrides(base, [f"model.chunk_size={text}"]).model.chunk_size is None


def test_override_sets_an_optional_int():
    assert apply_overrides(ExperimentConfig(), ["model.chunk_size=64"]).model.chunk_size == 64


def test_override_sets_an_optional_float():
    cfg = apply_overrides(ExperimentConfig(), ["train.max_seconds=30"])
    assert cfg.train.max_seconds == 30.0 and type(cfg.train.max_seconds) is float


def test_override_sets_a_literal_choice():
    assert apply_overrides(ExperimentConfig(), ["model.representation=byte"]).model.representation == "byte"


def test_overrides_apply_in_order_and_leave_other_fields_alone():
    base = ExperimentConfig(model=ModelConfig.from_name("tiny"))
    cfg = apply_overrides(base, ["model.n_layers=3", "train.lr=0.01", "model.n_layers=5"])
    assert cfg.model.n_layers == 5 and cfg.train.lr == 0.01
    assert dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=base.model.n_layers),
                               train=dataclasses.replace(cfg.train, lr=base.train.lr)) == base


@pytest.mark.parametrize("assignments", [
    pytest.param(["model.n_heads=3", "model.d_model=96"], id="within-a-section"),
    pytest.param(["train.context_bytes=256", "model.max_positions=256"], id="across-sections"),
])
def test_overrides_are_validated_together_whatever_their_order(assignments):
    # each assignment alone breaks a cross-field check (64 % 3, a 256-byte context in 128) that the pair satisfies
    base = ExperimentConfig(model=ModelConfig.from_name("tiny", kind="patched"))
    for order in (assignments, assignments[::-1]):
        flat = flatten(apply_overrides(base, order))
        assert [f"{key}={flat[key]}" for key in (a.split("=")[0] for a in assignments)] == assignments


def test_overrides_return_a_new_config_and_leave_the_input_unchanged():
    base = ExperimentConfig()
    cfg = apply_overrides(base, ["model.n_layers=8"])
    assert base.model.n_layers == ModelConfig().n_layers and cfg is not base


def test_override_strips_whitespace_around_key_and_value():
    assert apply_overrides(ExperimentConfig(), [" model.n_layers = 6 "]).model.n_layers == 6


def test_override_value_may_contain_an_equals_sign():
    # Split on the first "=" only; the Literal check then rejects the value, naming the field.
    with pytest.raises(ValueError, match="model.representation"):
        apply_overrides(ExperimentConfig(), ["model.representation=a=b"])


def test_override_unknown_key_names_the_known_fields():
    with pytest.raises(ValueError, match="nope") as info:
        apply_overrides(ExperimentConfig(), ["model.nope=1"])
    assert "n_layers" in str(info.value) and "dropout" in str(info.value)


def test_override_unknown_section_names_the_known_sections():
    with pytest.raises(ValueError, match="optim") as info:
        apply_overrides(ExperimentConfig(), ["optim.lr=1"])
    assert "model" in str(info.value) and "train" in str(info.value)


def test_override_of_a_whole_section_is_rejected():
    with pytest.raises(ValueError, match="section"):
        apply_overrides(ExperimentConfig(), ["model=tiny"])


def test_override_path_through_a_scalar_is_rejected():
    with pytest.raises(ValueError, match="not a config section"):
        apply_overrides(ExperimentConfig(), ["model.n_layers.x=1"])


def test_override_without_equals_explains_the_syntax():
    with pytest.raises(ValueError, match="key=value") as info:
        apply_overrides(ExperimentConfig(), ["model.n_layers"])
    assert "model.n_layers" in str(info.value)


def test_override_that_fails_validation_names_the_field():
    with pytest.raises(ValueError, match="model.dropout"):
        apply_overrides(ExperimentConfig(), ["model.dropout=2"])


def test_override_cross_field_validation_runs():
    with pytest.raises(ValueError, match="model.d_model"):
        apply_overrides(ExperimentConfig(), ["model.n_heads=3"])


def test_override_with_an_unparseable_number_names_the_field():
    with pytest.raises(ValueError, match="train.lr"):
        apply_overrides(ExperimentConfig(), ["train.lr=fast"])


def test_override_works_on_a_section_config_directly():
    assert apply_overrides(TrainConfig(), ["lr=0.5"]).lr == 0.5


@pytest.mark.parametrize("cfg, name", [(ModelConfig(), "n_layers"), (TrainConfig(), "lr"),
                                       (ExperimentConfig(), "model")])
def test_configs_are_frozen(cfg, name):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, getattr(cfg, name))


def test_flatten_gives_dotted_keys_for_every_field():
    flat = flatten(ExperimentConfig())
    assert flat["model.n_layers"] == ModelConfig().n_layers
    assert flat["train.lr"] == TrainConfig().lr
    expected = ({f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}
                | {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
                | {f"diffusion.{f.name}" for f in dataclasses.fields(DiffusionConfig)}
                | {f"scaling.{f.name}" for f in dataclasses.fields(ScalingConfig)}
                | {f"safety.{f.name}" for f in dataclasses.fields(SafetyConfig)}
                | {f"parallel.{f.name}" for f in dataclasses.fields(ParallelConfig)})
    assert set(flat) == expected


def test_flatten_keys_are_accepted_by_apply_overrides():
    cfg = ExperimentConfig(model=NON_DEFAULT_MODEL, train=NON_DEFAULT_TRAIN)
    assignments = [f"{k}={'none' if v is None else v}" for k, v in flatten(cfg).items()]
    assert apply_overrides(ExperimentConfig(), assignments) == cfg


def test_flatten_of_a_section_has_undotted_keys():
    assert flatten(TrainConfig())["lr"] == TrainConfig().lr


def test_the_safety_section_holds_the_gates_settings_and_validates_them():
    cfg = apply_overrides(ExperimentConfig(), ["safety.c_floor=0.4", "safety.burn_in=2"])
    assert (cfg.safety.c_floor, cfg.safety.burn_in) == (0.4, 2)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"safety\.s_floor: must be in \[0, 1\]"):
        apply_overrides(ExperimentConfig(), ["safety.s_floor=1.5"])
    with pytest.raises(ValueError, match=r"safety\.burn_in: expected int"):
        from_dict(ExperimentConfig, {"safety": {"burn_in": 1.5}})


def test_renamed_fields_keep_their_old_names_everywhere():
    from bitlm.renames import RENAMED_FIELDS

    assert TrainConfig(eval_batches=3).n_eval_batches == 3  # keyword
    assert dataclasses.replace(TrainConfig(), log_every=7).log_every_steps == 7  # dataclasses.replace
    assert ScalingConfig(window=4).window == 4  # attribute
    cfg = from_dict(ExperimentConfig, {"train": {"keep_checkpoints": 5}, "model": {"local_layers": 1},
                                       "scaling": {"add_layers": 2}})  # config documents, checkpoints
    assert (cfg.train.n_checkpoints_kept, cfg.model.n_local_layers, cfg.scaling.n_added_layers) == (5, 1, 2)
    cfg = apply_overrides(ExperimentConfig(), ["train.eval_every=9", "train.checkpoint_every=3",
                                               "model.max_seq_len=576"])  # --set
    assert (cfg.train.eval_every_steps, cfg.train.checkpoint_every_steps, cfg.model.max_positions) == (9, 3, 576)
    assert from_dict(ModelConfig, {"max_seq_len": 300}).max_positions == 300  # a checkpoint's model config
    with pytest.raises(ValueError, match=r"^train.eval_batches: must be >= 1.*train.eval_batches is now train.n_eval"):
        apply_overrides(ExperimentConfig(), ["train.eval_batches=0"])
    sections = {"model": ModelConfig, "train": TrainConfig, "scaling": ScalingConfig}
    for section, names in RENAMED_FIELDS.items():
        fields = {f.name for f in dataclasses.fields(sections[section])}
        assert set(names.values()) <= fields and not set(names) & fields
