"""A student made of the teacher's own layers (``student.init_layers``, layer-dropped as DistilBERT) for Llama, Qwen2
and GPT-2: exactly the chosen layers' weights, the forward of the teacher with the dropped layers turned into the
identity, KV-cached decoding equal to the full forward, a save/load round trip; bad layer lists refused before any
training."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from tw_rl.config import ConfigError, load_config
from tw_rl.models.factory import build_model, check_init_layers, init_from_layers, pruned_config, save_model
from tw_rl.models.family import Stepper, forced
from tw_rl.models.tokenizer import train_tokenizer

V = 40


def _teacher(kind: str, layers: int = 4) -> torch.nn.Module:
    """A tiny randomly initialised decoder-only LM of ``kind`` (Qwen2 with sliding-window layers from layer 2 on, a
    window shorter than the test sequences, so that the per-layer ``layer_types`` matter)."""
    common = dict(vocab_size=V, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if kind == "llama":
        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=layers, max_position_embeddings=64, **common)
    elif kind == "qwen2":
        config = Qwen2Config(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=layers, max_position_embeddings=64, use_sliding_window=True,
                             sliding_window=3, max_window_layers=2, tie_word_embeddings=False, **common)
    else:
        config = GPT2Config(n_embd=16, n_inner=32, n_head=2, n_layer=layers, n_positions=64, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _stack(model):
    return model.transformer.h if model.config.model_type == "gpt2" else model.model.layers


def _identity_except(teacher, keep: list[int]):
    """The teacher with every layer not in ``keep`` made the identity: its attention and MLP output projections
    (weights and biases) zeroed, so the residual stream passes it unchanged — the layer-dropped model by hand."""
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for i, layer in enumerate(_stack(model)):
            if i in keep:
                continue
            outs = ([layer.attn.c_proj, layer.mlp.c_proj] if model.config.model_type == "gpt2"
                    else [layer.self_attn.o_proj, layer.mlp.down_proj])
            for lin in outs:
                for p in lin.parameters():
                    p.zero_()
    return model


def _batch():
    """Two inputs of different lengths (right-padded) and 7 output positions (start token, then 6 ids)."""
    src = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = src != 0
    dec = torch.tensor([[0, 14, 15, 16, 17, 18, 19], [0, 20, 21, 22, 23, 24, 25]])
    return src, mask, dec


KINDS = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_student_keeps_exactly_the_chosen_layers_and_copies_them(kind):
    teacher = _teacher(kind)
    keep = [1, 3]
    student = init_from_layers(teacher, keep)
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2 and len(_stack(student)) == 2
    if kind == "gpt2":
        assert student.config.n_layer == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    prefix = "transformer.h." if kind == "gpt2" else "model.layers."
    n_layer_tensors = 0
    for key, value in s_state.items():
        if key.startswith(prefix):
            j, rest = key[len(prefix):].split(".", 1)
            want = t_state[f"{prefix}{keep[int(j)]}.{rest}"]
            n_layer_tensors += 1
        else:
            want = t_state[key]  # embeddings, final norm, output layer
        assert torch.equal(value, want), key
    assert n_layer_tensors == 2 * sum(k.startswith(f"{prefix}0.") for k in t_state)
    assert set(s_state) == {k for k in t_state if not k.startswith(prefix)} | {
        k.replace(f"{prefix}{keep[j]}.", f"{prefix}{j}.") for j in range(2) for k in t_state
        if k.startswith(f"{prefix}{keep[j]}.")}
    # every attention module knows its new place (the KV cache's slot)
    idx = [m.layer_idx for m in student.modules() if type(m).__name__.endswith("Attention")]
    assert idx == [0, 1]
    if kind == "qwen2":
        assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
        assert [layer.self_attn.sliding_window for layer in _stack(student)] == [None, 3]
    # copies: training the student leaves the teacher as it was
    with torch.no_grad():
        next(iter(_stack(student)[0].parameters())).add_(1.0)
        student.get_input_embeddings().weight.add_(1.0)
    assert torch.equal(teacher.state_dict()[next(k for k in t_state if k.startswith(f"{prefix}1."))],
                       t_state[next(k for k in t_state if k.startswith(f"{prefix}1."))])
    assert not torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


@pytest.mark.parametrize("kind", KINDS)
def test_the_student_computes_the_teacher_with_the_dropped_layers_as_identity(kind, tmp_path):
    teacher = _teacher(kind)
    keep = [0, 2, 3]
    student = init_from_layers(teacher, keep)
    by_hand = _identity_except(teacher, keep)
    src, mask, dec = _batch()
    with torch.no_grad():
        got = forced(student, src, mask, dec_ids=dec).logits
        want = forced(by_hand, src, mask, dec_ids=dec).logits
        full = forced(teacher, src, mask, dec_ids=dec).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - full).abs().max() > 1e-3  # layer 1 did something in the teacher
    # the saved student reloads as the same model (its config holds the sliced layer lists)
    tok = train_tokenizer(["ka lo mi", "ba lo"] * 20, V)
    save_model(student, tok, tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        torch.testing.assert_close(forced(again, src, mask, dec_ids=dec).logits, got, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cached_decoding_of_the_student_equals_its_full_forward(kind):
    """Stepper (input, then one or two positions per feed, KV cache) = forced, on rows of different lengths: a
    layer that kept its old ``layer_idx`` would read another layer's cache slot (or an absent one)."""
    student = init_from_layers(_teacher(kind), [1, 3])
    src, mask, dec = _batch()
    with torch.no_grad():
        want = forced(student, src, mask, dec_ids=dec).logits
        steps = Stepper(student, src, mask)
        got = [steps.feed(dec[:, :2]), steps.feed(dec[:, 2:3]), steps.feed(dec[:, 3:5]), steps.feed(dec[:, 5:])]
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-5, rtol=1e-5)


def test_pruned_config_slices_the_layer_lists_and_counts_the_window_layers():
    teacher = _teacher("qwen2", layers=5)
    config = pruned_config(teacher.config, [0, 1, 4])
    assert config.num_hidden_layers == 3 and config.max_window_layers == 2
    assert config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert teacher.config.num_hidden_layers == 5 and len(teacher.config.layer_types) == 5  # left as it was


@pytest.mark.parametrize("layers, match", [
    ([], r"student\.init_layers=\[\] is empty"),
    ([0, 4], r"init_layers=\[0, 4\]: the teacher .* has 4 decoder layers \(0\.\.3\); \[4\] is out of range"),
    ([2, 1], r"once, in increasing order, e\.g\. \[1, 2\]"),
    ([1, 1], r"once, in increasing order, e\.g\. \[1\]"),
])
def test_bad_layer_lists_are_config_errors_naming_the_key(layers, match):
    with pytest.raises(ConfigError, match=match):
        check_init_layers(layers, _teacher("llama").config, "T")
    with pytest.raises(ConfigError, match=match):
        init_from_layers(_teacher("gpt2"), layers)


def test_a_seq2seq_or_another_kind_of_teacher_is_refused():
    tok = train_tokenizer(["ka lo mi", "ba lo"] * 20, V)
    t5 = build_model(load_config(None, []).teacher.arch, tok, 0, 64)
    with pytest.raises(ConfigError, match=r"needs a decoder-only teacher .* encoder-decoder \(t5\)"):
        init_from_layers(t5, [0])
    scaled = _teacher("gpt2").config
    scaled.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ConfigError, match=r"scale_attn_by_inverse_layer_idx"):
        check_init_layers([0], scaled, "T")
    other = copy.deepcopy(_teacher("llama").config)
    other.model_type = "mistral"
    with pytest.raises(ConfigError, match=r"'mistral' model; tw-rl drops layers of llama, qwen2, gpt2 models only"):
        check_init_layers([0], other, "T")


@pytest.mark.parametrize("overrides, match", [
    (["teacher.arch.model_type=llama", "student.init_layers=[]"], r"student\.init_layers=\[\] is empty"),
    (["teacher.arch.model_type=llama", "student.init_layers=[1,0]"], r"increasing order"),
    (["teacher.arch.model_type=llama", "student.init_layers=[0,0]"], r"increasing order"),
    (["teacher.arch.model_type=llama", "student.init_layers=[-1]"], r"student\.init_layers=-1 is out of range"),
    (["teacher.arch.model_type=llama", "teacher.arch.num_layers=2", "student.init_layers=[0,2]"],
     r"teacher\.arch\.num_layers=2 layers \(0\.\.1\); drop layer 2"),
    (["student.init_layers=[0]"], r"needs a decoder-only teacher .* teacher\.arch\.model_type=t5"),
    (["teacher.arch.model_type=llama", "student.init_layers=[0]", "student.name_or_path=/x"],
     r"student\.name_or_path='/x' gives one"),
    (["pretrain.student_targets=teacher", "student.name_or_path=/x"], r"student_targets=teacher .* gives the student"),
    (["pretrain.student_targets=logits"], r"pretrain\.student_targets='logits' is not allowed"),
])
def test_bad_settings_are_refused_by_the_config_loader(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
