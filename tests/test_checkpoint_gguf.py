"""GGUF (llama.cpp) files: save_gguf -> load_model round trips for every type and layout, agreement with
transformers' own GGUF loader, the q/k row order, and bad files refused with the file and field named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FP32_RTOL, rel_err
from model_helpers import random_model

from mistral_ref.backends import decode_step
from mistral_ref.checkpoint import CheckpointError, load_model, permute_qk, save_checkpoint, save_gguf
from mistral_ref.checkpoint.gguf import QUANTIZED_TYPES, SAVE_TYPES, gguf_index, gguf_model_args, open_gguf
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.quantize import QuantizedWeight, quantize_weight

gguf = pytest.importorskip("gguf")

# Row lengths (dim, hidden_dim) are multiples of 32, the block of the legacy quantized types.
DENSE = ModelArgs(dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=160,
                  norm_eps=1e-6, rope_theta=1e4, max_seq_len=512)
MOE = dataclasses.replace(DENSE, moe=MoeArgs(4, 2), sliding_window=5)
TOKENS = torch.randint(0, 160, (2, 11), generator=torch.Generator().manual_seed(3))


def roundtrip_values(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a tensor of `qtype` reads back as, computed by the gguf package directly (the independent path)."""
    t = gguf.GGMLQuantizationType[qtype]
    if qtype in ("F16", "BF16"):
        return w.to(torch.float16 if qtype == "F16" else torch.bfloat16)
    return torch.from_numpy(gguf.dequantize(gguf.quantize(w.float().numpy(), t), t))


@pytest.mark.parametrize("args", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("qtype", SAVE_TYPES)
def test_save_then_load_gives_the_written_values(tmp_path, args, qtype, one_thread):
    model = random_model(args)
    path = save_gguf(model, tmp_path / "m.gguf", qtype)
    loaded = load_model(path)
    assert loaded.args == args and loaded.checkpoint_files.format == "gguf"
    assert loaded.dtype == {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(qtype,
                                                                                                  torch.float32)
    for name, w in model.state_dict().items():
        got = loaded.state_dict()[name]
        kept_f32 = w.ndim == 1 or name.endswith("feed_forward.gate.weight")  # norms and the router stay F32
        want = w if kept_f32 or qtype == "F32" else roundtrip_values(w, qtype)
        assert torch.equal(got, want.to(loaded.dtype)), name  # (an F16 file loads in fp16, its norms too)
    if qtype == "F32":
        with torch.no_grad():
            assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_quantization_error_is_what_the_type_allows(tmp_path):
    """Q8_0 keeps each weight within half a step of its block's scale d = max|block| / 127, plus the rounding of
    d itself to fp16 (up to 127 steps of 2**-11 d)."""
    w = random_model(DENSE).layers[0].attention.wq.weight.detach()
    loaded = load_model(save_gguf(random_model(DENSE), tmp_path / "q8.gguf", "Q8_0"))
    got = loaded.layers[0].attention.wq.weight
    step = w.view(-1, 32).abs().amax(-1, keepdim=True) / 127
    assert ((got - w).view(-1, 32).abs() <= step * (0.5 + 127 * 2**-11)).all()
    assert not torch.equal(got, w)


def test_dtype_override(tmp_path):
    model = random_model(DENSE)
    as_bf16 = load_model(save_gguf(model, tmp_path / "f32.gguf", "F32"), dtype="bf16")
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16.output.weight, model.output.weight.to(torch.bfloat16))


# ---- files written the way llama.cpp's tools write them, made here with the gguf writer ----------------------
def rewrite(src: Path, dst: Path, *, arch: str | None = None, drop: tuple[str, ...] = (),
            meta: dict | None = None, replace: dict | None = None, split_experts: bool = False,
            add: dict | None = None) -> Path:
    """Copy a GGUF file with changes: another architecture string, tensors dropped, metadata added or changed
    ({key: (value, GGUFValueType)}; a None value drops the key), tensors replaced ({name: (array, ggml type)}),
    stacked experts written one tensor per expert (the layout of files before April 2024), tensors added
    ({name: float32 array, or (array, ggml type) for a quantized one's bytes})."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    arch = arch or old_arch
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or (meta or {}).get(key, (0,))[0] is None:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.replace(old_arch + ".", arch + ".", 1), field.contents(), field.types[0], sub)
    for key, (value, vtype) in (meta or {}).items():
        if value is not None:
            writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name in drop:
            continue
        data, kind = (replace or {}).get(t.name, (np.array(t.data), t.tensor_type))
        raw = kind if data.dtype == np.uint8 else None
        if split_experts and "_exps" in t.name:
            for e in range(data.shape[0]):
                name = t.name.replace("_exps.weight", f".{e}.weight")
                writer.add_tensor(name, np.ascontiguousarray(data[e]), raw_dtype=raw)
        else:
            writer.add_tensor(t.name, data, raw_dtype=raw)
    for name, data in (add or {}).items():
        data, kind = data if isinstance(data, tuple) else (data, None)
        writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_experts_one_tensor_each_load_like_stacked_ones(tmp_path):
    stacked = save_gguf(random_model(MOE), tmp_path / "moe.gguf", "Q8_0")
    legacy = rewrite(stacked, tmp_path / "legacy.gguf", split_experts=True)
    names = [t.name for t in gguf.GGUFReader(legacy).tensors]
    assert "blk.0.ffn_gate.3.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
    a, b = load_model(stacked), load_model(legacy)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_file_without_output_ties_it_to_the_embeddings(tmp_path):
    src = save_gguf(random_model(DENSE), tmp_path / "m.gguf", "F32")
    tied = load_model(rewrite(src, tmp_path / "tied.gguf", drop=("output.weight",)))
    assert torch.equal(tied.output.weight, tied.tok_embeddings.weight)


def test_mistral3_without_scaling_reads_as_llama(tmp_path):
    src = save_gguf(random_model(DENSE), tmp_path / "m.gguf", "F32")
    m3 = load_model(rewrite(src, tmp_path / "m3.gguf", arch="mistral3"))
    assert m3.args == DENSE


# The fp16 scale fields of one block of each K-quant (byte offsets), set to small finite values below.
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
K_ARGS = ModelArgs(dim=256, n_layers=1, hidden_dim=256, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=64,
                   norm_eps=1e-5, rope_theta=1e6, max_seq_len=512)


def k_quant_blocks(shape: tuple[int, int], qtype: str, seed: int) -> np.ndarray:
    """Random valid blocks of a K-quant for a (rows, columns) tensor: random bits, scales of about 1e-3."""
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    for offset in K_SCALES[qtype]:
        raw[..., offset:offset + 2] = np.frombuffer(np.float16(1e-3 * (1 + rng.random())).tobytes(), np.uint8)
    return raw.reshape(shape[0], -1)


@pytest.mark.parametrize("qtype", list(K_SCALES))
def test_k_quants_dequantize_as_the_gguf_package_does(tmp_path, qtype):
    assert qtype in QUANTIZED_TYPES
    src = save_gguf(random_model(K_ARGS), tmp_path / "f32.gguf", "F32")
    names = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "output.weight"]
    reader = gguf.GGUFReader(src)
    shapes = {t.name: t.data.shape for t in reader.tensors}
    blocks = {n: k_quant_blocks(shapes[n], qtype, i) for i, n in enumerate(names)}
    path = rewrite(src, tmp_path / f"{qtype}.gguf",
                   replace={n: (b, gguf.GGMLQuantizationType[qtype]) for n, b in blocks.items()})
    model = load_model(path)
    t = gguf.GGMLQuantizationType[qtype]
    for gname, native in zip(names, ["layers.0.attention.wq.weight", "layers.0.feed_forward.w2.weight",
                                     "output.weight"]):
        want = torch.from_numpy(gguf.dequantize(blocks[gname], t))
        got = model.state_dict()[native]
        assert torch.equal(got, want) and got.abs().max() > 0, gname
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS % 64)).all()


# ---- agreement with transformers' own GGUF loader ------------------------------------------------------------
@pytest.mark.oracle
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
def test_transformers_gguf_loader_agrees(tmp_path, qtype, one_thread):
    """The same file through transformers' GGUF loader (which undoes llama.cpp's q/k permutation itself) and
    ours: fp32 logits within 1e-5, and its q_proj is our wq permuted to HF order."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = save_gguf(random_model(DENSE), tmp_path / "m.gguf", qtype)
    ours = load_model(path, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(ours(TOKENS), hf(TOKENS).logits) <= FP32_RTOL
    layer = hf.model.layers[1].self_attn
    assert torch.equal(layer.q_proj.weight, permute_qk(ours.layers[1].attention.wq.weight, 16, "hf"))
    assert torch.equal(layer.k_proj.weight, permute_qk(ours.layers[1].attention.wk.weight, 16, "hf"))


@pytest.mark.oracle
def test_transformers_agrees_on_k_quants(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    src = save_gguf(random_model(K_ARGS), tmp_path / "f32.gguf", "F32")
    reader = gguf.GGUFReader(src)
    replace = {t.name: (k_quant_blocks(t.data.shape, q, i), gguf.GGMLQuantizationType[q])
               for i, (t, q) in enumerate(zip([t for t in reader.tensors if t.data.ndim == 2], list(K_SCALES) * 3))}
    path = rewrite(src, tmp_path / "k.gguf", replace=replace)
    ours = load_model(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(ours(TOKENS % 64), hf(TOKENS % 64).logits) <= FP32_RTOL


# ---- bad input -----------------------------------------------------------------------------------------------
def test_a_file_that_is_neither_safetensors_nor_gguf(tmp_path):
    junk = tmp_path / "weights.dat"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match=r"weights\.dat: neither a \.safetensors file nor a GGUF file"):
        load_model(junk)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOTGGUF!" * 4)
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        load_model(fake)


def test_unsupported_architecture_is_named(tmp_path):
    src = save_gguf(random_model(DENSE), tmp_path / "m.gguf", "F32")
    with pytest.raises(CheckpointError, match=r"qwen2\.gguf: general\.architecture is 'qwen2'"):
        load_model(rewrite(src, tmp_path / "qwen2.gguf", arch="qwen2"))


def test_unsupported_tensor_type_is_named(tmp_path):
    src = save_gguf(random_model(DENSE), tmp_path / "m.gguf", "F32")
    iq = gguf.GGMLQuantizationType.IQ4_NL  # 32 weights in 18 bytes
    shape = next(t.data.shape for t in gguf.GGUFReader(src).tensors if t.name == "blk.1.attn_v.weight")
    blocks = np.zeros((shape[0], shape[1] // 32 * 18), dtype=np.uint8)
    path = rewrite(src, tmp_path / "iq.gguf", replace={"blk.1.attn_v.weight": (blocks, iq)})
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'blk\.1\.attn_v\.weight' has ggml type IQ4_NL") as e:
        load_model(path)
    assert "that the metadata describes" not in str(e.value)  # present, unreadable: not "missing" too


@pytest.mark.parametrize("key,value,vtype,message", [
    ("llama.rope.scaling.type", "yarn", "STRING", r"llama\.rope\.scaling\.type is 'yarn'"),
    ("llama.attention.temperature_scale", 0.1, "FLOAT32", r"llama\.attention\.temperature_scale is set"),
    ("llama.rope.dimension_count", 8, "UINT32", r"llama\.rope\.dimension_count is 8 but the head width is 16"),
])
def test_features_this_model_lacks_are_named(tmp_path, key, value, vtype, message):
    src = save_gguf(random_model(DENSE), tmp_path / "m.gguf", "F32")
    path = rewrite(src, tmp_path / "x.gguf", meta={key: (value, gguf.GGUFValueType[vtype])}) \
        if key != "llama.rope.dimension_count" else _with_value(src, tmp_path / "x.gguf", key, value)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def _with_value(src: Path, dst: Path, key: str, value: int) -> Path:
    """src with an existing uint32 metadata value changed."""
    out = rewrite(src, dst)
    reader = gguf.GGUFReader(out, mode="r+")
    reader.fields[key].parts[-1][0] = value
    reader.data.flush()
    return out


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    src = save_gguf(random_model(DENSE), tmp_path / "m.gguf", "F32")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\).*layers\.1\.feed_forward\.w2\.weight"):
        load_model(rewrite(src, tmp_path / "a.gguf", drop=("blk.1.ffn_down.weight",)))
    wrong = np.zeros((96, 32), dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_gate\.weight' has shape \[96, 32\], expected "
                                              r"\[96, 64\]") as e:
        load_model(rewrite(src, tmp_path / "b.gguf",
                           replace={"blk.0.ffn_gate.weight": (wrong, gguf.GGMLQuantizationType.F32)}))
    assert "that the metadata describes" not in str(e.value)  # not reported as missing too


def test_the_metadata_reader_alone(tmp_path):
    path = save_gguf(random_model(MOE), tmp_path / "m.gguf", "Q8_0")
    reader = open_gguf(path)
    args = gguf_model_args(reader, path)
    assert args == MOE
    index = gguf_index(reader, args, path)
    assert index["layers.1.feed_forward.experts.3.w2.weight"].expert == 3


def test_without_the_gguf_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = save_gguf(random_model(DENSE), tmp_path / "m.gguf", "F32")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(CheckpointError, match=r"m\.gguf: .*pip install 'mistral-ref\[gguf\]'"):
        load_model(path)


def test_save_refuses_what_gguf_cannot_hold(tmp_path):
    model = random_model(dataclasses.replace(DENSE, dim=48, head_dim=12))
    with pytest.raises(CheckpointError, match=r"rows of 48 values, not a multiple of Q8_0's block of 32"):
        save_gguf(model, tmp_path / "m.gguf", "Q8_0")
    with pytest.raises(ValueError, match="qtype must be one of"):
        save_gguf(model, tmp_path / "m.gguf", "Q4_K")
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_convert_cli_writes_gguf_and_its_tokenizer(tmp_path):
    from mistral_ref.cli import main
    from mistral_ref.embedded import EMBEDDED_MODEL_DIR

    out = tmp_path / "out" / "tiny.gguf"
    out.parent.mkdir()
    assert main(["convert", str(EMBEDDED_MODEL_DIR), str(out), "--to", "gguf", "--gguf-type", "Q8_0",
                 "--threads", "1"]) == 0
    assert (out.parent / "tokenizer.model.v3").is_file()
    native = load_model(EMBEDDED_MODEL_DIR, dtype="float32")
    q8 = load_model(out)
    assert q8.args == native.args
    with torch.no_grad():
        err = rel_err(q8(TOKENS), native(TOKENS))
    assert 0 < err < 0.05  # Q8_0 of a trained model: close, not equal
    save_checkpoint(native, tmp_path / "hf", format="hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "x.bin"), "--to", "gguf"]) == 2


# ---- Mistral Small 4 as llama.cpp's "mistral4" (checkpoint/gguf_mistral4.py) ------------------------------------
def small4_args(variant: str = "softmax") -> ModelArgs:
    """test_mla's tiny Small-4 shape (a dense first layer, then 8 experts + a shared one; YaRN and the query
    scaling over 8 positions) with what llama.cpp's mistral4 computes alike: norm_eps 1e-6, one expert group."""
    from test_mla import tiny

    args = tiny("sigmoid" if variant == "sigmoid" else "softmax", q_lora_rank=None if variant == "no q_lora" else 12)
    args = dataclasses.replace(args, norm_eps=1e-6, max_seq_len=64)
    if variant == "sigmoid":
        args = dataclasses.replace(args, fine_moe=dataclasses.replace(args.fine_moe, n_group=1, topk_group=1))
    return args


@pytest.mark.parametrize("variant", ["softmax", "sigmoid", "no q_lora"])
@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0"])
def test_mistral4_round_trips(tmp_path, variant, qtype, one_thread):
    """save_gguf -> load_model: the same ModelArgs (latent attention, experts, YaRN, query scaling, routing) and
    the written values (kv_b_proj rebuilt from attn_k_b / attn_v_b), so the same logits."""
    args = small4_args(variant)
    if qtype == "Q8_0":  # blocks of 32 values a row
        mla = dataclasses.replace(args.mla, kv_lora_rank=32, qk_nope_head_dim=32, v_head_dim=32,
                                  q_lora_rank=args.mla.q_lora_rank and 32)
        args = dataclasses.replace(args, dim=64, hidden_dim=64, mla=mla, head_dim=mla.qk_head_dim,
                                   fine_moe=dataclasses.replace(args.fine_moe, moe_intermediate_size=32))
    model = random_model(args)
    for layer in model.layers:  # a score-correction bias (sigmoid routing) that is not zero
        bias = getattr(getattr(layer.feed_forward, "gate", None), "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape))
    path = save_gguf(model, tmp_path / "small4.gguf", qtype)
    back = load_model(path)
    assert back.args == args
    H, m = args.n_heads, args.mla
    for name, w in model.state_dict().items():
        got = back.state_dict()[name]
        if w.ndim == 1 or name.endswith(("gate.weight", "e_score_correction_bias")):  # F32 in the file
            want = w
        elif name.endswith("kv_b_proj.weight"):  # written as attn_k_b (its key rows transposed) and attn_v_b
            heads = w.reshape(H, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
            k_b = roundtrip_values(heads[:, :m.qk_nope_head_dim].transpose(1, 2).contiguous(), qtype)
            v_b = roundtrip_values(heads[:, m.qk_nope_head_dim:].contiguous(), qtype)
            want = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(w.shape)
        else:
            want = roundtrip_values(w, qtype)
        assert torch.equal(got, want.to(got.dtype)), name
    if qtype == "F32":
        tokens = torch.randint(0, args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(back(tokens), model(tokens))


def test_mistral4_fused_experts_load_like_stacked_ones(tmp_path):
    """llama.cpp's own converter writes Small 4's experts fused, ffn_gate_up_exps (E, 2 x ff, dim): gate rows,
    then up rows; they load as the separate stacks do."""
    args = small4_args()
    src = save_gguf(random_model(args), tmp_path / "small4.gguf", "F32")
    reader = gguf.GGUFReader(src)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    fused = {"blk.1.ffn_gate_up_exps.weight": np.concatenate(
        [tensors["blk.1.ffn_gate_exps.weight"], tensors["blk.1.ffn_up_exps.weight"]], axis=1)}
    path = rewrite(src, tmp_path / "fused.gguf", drop=("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"),
                   add=fused)
    a, b = load_model(src), load_model(path)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def quantizable_small4(variant: str = "softmax") -> ModelArgs:
    """small4_args with every matrix fit for Q8_0 / Q4_0 blocks of 32 and int4's groups (rows a multiple of 16)."""
    args = small4_args(variant)
    mla = dataclasses.replace(args.mla, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                              q_lora_rank=args.mla.q_lora_rank and 32)
    return dataclasses.replace(args, dim=64, hidden_dim=64, vocab_size=64, mla=mla, head_dim=mla.qk_head_dim,
                               fine_moe=dataclasses.replace(args.fine_moe, moe_intermediate_size=32))


@pytest.mark.parametrize("qtype,scheme", [("Q4_0", "int4"), ("Q8_0", "int8"), ("F32", "int4")])
@pytest.mark.parametrize("fused", [False, True], ids=["stacked", "fused"])
def test_mistral4_quantize_on_load(tmp_path, qtype, scheme, fused, one_thread):
    """load_model(mistral4 file, quantize=...): each matrix from one tensor of the file (or rows of an expert's
    slice, fused gate|up included) as the "llama" files' matrices: Q4_0 -> int4 groups of 32 with the file's own
    codes and scales (the same values as loading it dequantized), anything else quantized from its values;
    kv_b_proj (attn_k_b transposed, attn_v_b) from its values.  The one-call decode step takes the result."""
    args = quantizable_small4()
    src = save_gguf(random_model(args), tmp_path / "small4.gguf", qtype)
    path = src
    if fused:  # llama.cpp's converter's layout
        tensors = {t.name: t for t in gguf.GGUFReader(src).tensors}
        gate, up = tensors["blk.1.ffn_gate_exps.weight"], tensors["blk.1.ffn_up_exps.weight"]
        data = np.concatenate([np.array(gate.data), np.array(up.data)], axis=1)
        path = rewrite(src, tmp_path / "fused.gguf", drop=(gate.name, up.name),
                       add={"blk.1.ffn_gate_up_exps.weight": (data, gate.tensor_type)})
    plain, quant = load_model(path), load_model(path, quantize=scheme)
    assert quant.quantization["scheme"] == scheme
    weights = {n: m.weight for n, m in quant.named_modules() if isinstance(getattr(m, "weight", None),
                                                                           QuantizedWeight)}
    assert len(weights) == sum(1 for n, p in plain.named_parameters() if p.ndim == 2 and "gate" not in n
                               and "tok_embeddings" not in n)
    for name, w in weights.items():
        want = plain.get_parameter(f"{name}.weight")
        got = w.dequantize(torch.float32)
        if qtype == "Q4_0" and "kv_b_proj" not in name:  # the file's own codes and scales
            assert torch.equal(got, want), name
        else:  # quantized from the values
            expect = quantize_weight(want, scheme, 32, name).dequantize(torch.float32)
            assert torch.equal(got, expect), name
    with torch.no_grad():  # the same model with those values: the same logits
        for name, w in weights.items():
            plain.get_parameter(f"{name}.weight").copy_(w.dequantize(torch.float32))
    tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert rel_err(quant(tokens), plain(tokens)) < FP32_RTOL
    assert decode_step.plan(quant) is not None


def test_mistral4_files_we_cannot_compute_are_refused(tmp_path):
    """Metadata that describes another cache or routing, a kv_b kept whole, a tensor of the wrong shape, an
    unknown tensor: CheckpointError naming the file and the key or tensor."""
    src = save_gguf(random_model(small4_args()), tmp_path / "small4.gguf", "F32")
    def u32(key: str, value: int | None) -> dict:
        return {"meta": {f"mistral4.{key}": (value, gguf.GGUFValueType.UINT32)}}

    cases = {
        r"mistral4\.attention\.head_count_kv is 4, expected 1": u32("attention.head_count_kv", 4),
        r"mistral4\.attention\.key_length is 9, expected 12": u32("attention.key_length", 9),
        r"key_length_mla / value_length_mla are missing": u32("attention.key_length_mla", None),
        r"mistral4\.expert_gating_func is 3": u32("expert_gating_func", 3),
        r"blk\.1\.attn_v_b\.weight' has shape \[4, 5, 7\], expected \[4, 5, 8\]": dict(
            replace={"blk.1.attn_v_b.weight": (np.zeros((4, 5, 7), np.float32), gguf.GGMLQuantizationType.F32)}),
        r"missing 1 tensor.*layers\.0\.attention\.kv_b_proj\.weight": dict(drop=("blk.0.attn_k_b.weight",)),
        r"1 tensor\(s\) that this mistral4 model does not have: blk\.0\.attn_kv_b\.weight": dict(
            add={"blk.0.attn_kv_b.weight": np.zeros((44, 8), np.float32)}),
    }
    for i, (message, change) in enumerate(cases.items()):
        with pytest.raises(CheckpointError, match=message):
            load_model(rewrite(src, tmp_path / f"bad{i}.gguf", **change))

