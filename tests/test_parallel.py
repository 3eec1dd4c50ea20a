"""Tensor- and expert-parallel execution (mistral_ref.parallel) against the single-process model.

The distributed tests start 2 and 4 processes on 127.0.0.1 with the gloo backend.  Each world size is
one spawn: the workers load every test checkpoint sharded (native and Hugging Face files), run a full forward
pass and a greedy decode with the KV cache, save what they computed, and the tests below compare it with the
same model run in this process.  Processes come from a forkserver that imports torch once, so a spawn costs
~0.1 s, not N imports of torch.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import TensorSlice, checkpoint_index, find_checkpoint, load_weights, save_checkpoint
from mistral_ref.config import FineMoeArgs, Llama4Scaling, MlaArgs, ModelArgs, MoeArgs, YarnArgs
from mistral_ref.model import Transformer
from mistral_ref.parallel import (
    ShardingError,
    build_local_model,
    check_divisible,
    init_from_env,
    load_sharded_model,
    local_args,
    shard_model,
    take_shard,
    tensor_shard,
)

# Tiny models of each shape that matters: a window shorter than the sequence, head_dim != dim / n_heads,
# experts.  All have GQA, and every sharded quantity divides by 4.
CONFIGS = {
    "mistral": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, hidden_dim=96,
                         vocab_size=128, norm_eps=1e-5, rope_theta=1e4, sliding_window=5),
    "nemo": ModelArgs(dim=48, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16, hidden_dim=64,
                      vocab_size=96, norm_eps=1e-5, rope_theta=1e6),
    "mixtral": ModelArgs(dim=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, hidden_dim=48,
                         vocab_size=64, norm_eps=1e-5, rope_theta=1e6,
                         moe=MoeArgs(num_experts=4, num_experts_per_tok=2)),
    # Ministral 3 3B-shaped: tied embeddings (the logits use the vocab-parallel embedding slice), YaRN past a
    # tiny original context and the llama-4 query scaling
    "ministral3": ModelArgs(dim=48, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, hidden_dim=64,
                            vocab_size=96, norm_eps=1e-5, rope_theta=1e6, tied_embeddings=True,
                            yarn=YarnArgs(factor=4.0, original_max_position_embeddings=4),
                            llama_4_scaling=Llama4Scaling(original_max_position_embeddings=4, beta=0.1)),
    # Mistral Small 4-shaped: latent attention with compressed queries, a dense first layer, 8 fine-grained experts
    # top-2 + a shared expert, softmax routing, YaRN with the softmax-scale correction and the query scaling
    "small4": ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=12, hidden_dim=48, vocab_size=128,
                        norm_eps=1e-6, rope_theta=1e4,
                        yarn=YarnArgs(factor=4.0, original_max_position_embeddings=4, apply_scale=False),
                        llama_4_scaling=Llama4Scaling(original_max_position_embeddings=4, beta=0.1),
                        mla=MlaArgs(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                                    q_lora_rank=12, mscale_all_dim=1.0),
                        fine_moe=FineMoeArgs(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                                             first_k_dense_replace=1)),
    # DeepSeek-V3-shaped: one q_proj, sigmoid routing with a (random) correction bias over 4 groups of which 2 are
    # eligible, routed_scaling_factor 2.5, two shared experts
    "deepseek": ModelArgs(dim=32, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=10, hidden_dim=40, vocab_size=96,
                          norm_eps=1e-6, rope_theta=1e4,
                          mla=MlaArgs(kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=4),
                          fine_moe=FineMoeArgs(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=12,
                                               n_shared_experts=2, n_group=4, topk_group=2,
                                               routed_scaling_factor=2.5, scoring_func="sigmoid")),
}
SCENARIOS = [("mistral", "expert"), ("nemo", "expert"), ("mixtral", "expert"), ("mixtral", "tensor"),
             ("ministral3", "expert"), ("small4", "expert"), ("small4", "tensor"), ("deepseek", "expert")]
FORMATS = ("native", "hf")
# Not shardable over 2 or 4 ranks: 3 kv heads (and 6 heads over 4); 3 experts with moe="expert".
BAD_CONFIGS = {
    "odd-heads": ModelArgs(dim=36, n_layers=1, n_heads=6, n_kv_heads=3, head_dim=6, hidden_dim=32,
                           vocab_size=64),
    "odd-experts": ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=32, vocab_size=64,
                             moe=MoeArgs(num_experts=3, num_experts_per_tok=2)),
}
PROMPT_LEN, NEW_TOKENS = 6, 12  # 18 positions: well past the window of 5
SPAWN_TIMEOUT_S = 240


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def build_model(name: str) -> Transformer:
    torch.manual_seed(sorted(CONFIGS).index(name))
    model = Transformer(CONFIGS[name]).eval()
    with torch.no_grad():
        for key, b in model.named_buffers():
            if key.endswith("e_score_correction_bias"):  # zeros would not test that every rank steers alike
                b.copy_(0.1 * torch.randn_like(b))
    return model


@torch.inference_mode()
def greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prefill then decode one token at a time with a KVCache built from model.args.

    returns tokens (B, steps), the logits that chose them (B, steps, vocab) and the cache's kv heads.
    """
    B, T = prompt.shape
    cache = KVCache(model.args, B, T + steps)
    logits = model(prompt, torch.arange(T).expand(B, T), cache)[:, -1]  # (B, vocab)
    tokens, step_logits = [], []
    for i in range(steps):
        tok = logits.argmax(-1)  # (B,)
        tokens.append(tok)
        step_logits.append(logits)
        if i + 1 < steps:
            logits = model(tok[:, None], torch.full((B, 1), T + i), cache)[:, -1]
    layer_cache = cache[0]  # a latent cache holds one latent "head" per token
    heads = (layer_cache.latent if model.args.mla is not None else layer_cache.k).shape[2]
    return torch.stack(tokens, 1), torch.stack(step_logits, 1), heads


def save_both_formats(model: Transformer, root: Path, name: str) -> None:
    """Native and HF checkpoints of `model`, each split over two or more files (exercises the file index)."""
    half = sum(p.nbytes for p in model.parameters()) // 2
    save_checkpoint(model, root / f"{name}-native", "native", max_shard_bytes=half)
    save_checkpoint(model, root / f"{name}-hf", "hf", max_shard_bytes=half)


# ---- the worker (runs in each spawned process) -------------------------------------------------------------
def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = init_from_env(backend="gloo")
    import torch.distributed as dist

    root_path = Path(root)
    inputs = torch.load(root_path / "inputs.pt")
    out: dict[str, dict] = {"env": {"rank": env.rank, "world_size": env.world_size,
                                    "device": str(env.device)}}
    try:
        with torch.inference_mode():
            for name, moe in SCENARIOS:
                for fmt in FORMATS:
                    model = load_sharded_model(root_path / f"{name}-{fmt}", moe=moe)
                    res = {"logits": model(inputs["tokens"]),
                           "state": {k: v.clone() for k, v in model.state_dict().items()}}
                    if fmt == "native":
                        res["greedy"], res["greedy_logits"], res["cache_kv_heads"] = greedy(
                            model, inputs["prompt"], NEW_TOKENS)
                    out[f"{name}-{moe}-{fmt}"] = res
            full = Transformer(CONFIGS["nemo"])  # shard_model: from an in-memory model, not a file
            full.load_state_dict(inputs["nemo_state"])
            out["nemo-shard_model"] = {"logits": shard_model(full)(inputs["tokens"])}
        for bad, moe in (("odd-heads", "tensor"), ("odd-experts", "expert")):
            try:
                load_sharded_model(root_path / bad, moe=moe)
                out[f"error-{bad}"] = None
            except ShardingError as e:
                out[f"error-{bad}"] = str(e)
        torch.save(out, root_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world_size: int, root: Path) -> None:
    import torch.multiprocessing as mp

    # A forkserver that has imported torch forks each worker in ~10 ms (spawn would import torch N times).
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "torch._dynamo", "torch.distributed", "safetensors.torch", "mistral_ref.parallel"])
    ctx = mp.start_processes(_worker, args=(world_size, _free_port(), str(root)), nprocs=world_size,
                             join=False, start_method="forkserver")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):  # raises ProcessRaisedException with the worker's traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world_size} gloo workers did not finish within {SPAWN_TIMEOUT_S} s")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def run(request, tmp_path_factory):
    """Write the checkpoints and inputs, run the workers once per world size, return (reference, per-rank)."""
    world_size = request.param
    root = tmp_path_factory.mktemp(f"parallel{world_size}")
    ref: dict[str, dict] = {}
    torch.manual_seed(1234)
    tokens = torch.randint(0, 64, (2, 12))  # (B, T): ids valid for every test vocab
    prompt = torch.randint(0, 64, (2, PROMPT_LEN))
    inputs = {"tokens": tokens, "prompt": prompt}
    with torch.inference_mode():
        for name in CONFIGS:
            model = build_model(name)
            save_both_formats(model, root, name)
            ref[name] = {"logits": model(tokens), "state": dict(model.state_dict())}
            ref[name]["greedy"], ref[name]["greedy_logits"], _ = greedy(model, prompt, NEW_TOKENS)
            if name == "nemo":
                inputs["nemo_state"] = dict(model.state_dict())
    for bad, args in BAD_CONFIGS.items():
        save_checkpoint(Transformer(args), root / bad)
    torch.save(inputs, root / "inputs.pt")
    _spawn(world_size, root)
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(world_size)]
    return world_size, ref, ranks


# ---- distributed tests -------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_init_from_env_joins_the_group(run):
    world_size, _, ranks = run
    assert [r["env"] for r in ranks] == [{"rank": i, "world_size": world_size, "device": "cpu"}
                                         for i in range(world_size)]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,moe", SCENARIOS)
def test_sharded_logits_equal_single_process(run, name, moe, fmt):
    _, ref, ranks = run
    for rank, res in enumerate(ranks):
        err = rel_err(res[f"{name}-{moe}-{fmt}"]["logits"], ref[name]["logits"])
        assert err <= 1e-5, f"rank {rank}: {name} ({moe}, {fmt}) logits differ, relative error {err:.2e}"
        # every rank ends with the same complete logits (so every rank picks the same token)
        assert torch.equal(res[f"{name}-{moe}-{fmt}"]["logits"], ranks[0][f"{name}-{moe}-{fmt}"]["logits"])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name,moe", SCENARIOS)
def test_sharded_greedy_decoding_with_kv_cache_is_token_identical(run, name, moe):
    world_size, ref, ranks = run
    for rank, res in enumerate(ranks):
        got = res[f"{name}-{moe}-native"]
        assert torch.equal(got["greedy"], ref[name]["greedy"]), f"rank {rank}: {name} ({moe}) tokens differ"
        err = rel_err(got["greedy_logits"], ref[name]["greedy_logits"])
        assert err <= 1e-5, f"rank {rank}: {name} ({moe}) decode logits differ, relative error {err:.2e}"
        if CONFIGS[name].mla is not None:  # every rank caches the whole latent (it is not split by heads)
            assert got["cache_kv_heads"] == 1
        else:  # the cache holds this rank's kv heads only
            assert got["cache_kv_heads"] == CONFIGS[name].n_kv_heads // world_size


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,moe", SCENARIOS)
def test_each_rank_loads_only_its_slice(run, name, moe, fmt):
    """The ranks' tensors are disjoint 1/N slices that concatenate back to the original bit for bit."""
    world_size, ref, ranks = run
    args, full = CONFIGS[name], ref[name]["state"]
    states = [r[f"{name}-{moe}-{fmt}"]["state"] for r in ranks]
    assert all(s.keys() == full.keys() for s in states)
    sharded_local, sharded_full = [0] * world_size, 0
    for key, w in full.items():
        shard = tensor_shard(key, args, 0, world_size, moe)
        if shard.dim is None:  # replicated
            assert all(torch.equal(s[key], w) for s in states), key
            continue
        assert torch.equal(torch.cat([s[key] for s in states], dim=shard.dim), w), key
        sharded_full += w.numel()
        for r, s in enumerate(states):
            sharded_local[r] += s[key].numel()
    assert sharded_local == [sharded_full // world_size] * world_size


@pytest.mark.distributed
@pytest.mark.slow
def test_shard_model_from_memory(run):
    _, ref, ranks = run
    for res in ranks:
        assert rel_err(res["nemo-shard_model"]["logits"], ref["nemo"]["logits"]) <= 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_loading_a_model_that_does_not_divide_names_the_quantity(run):
    world_size, _, ranks = run
    heads = "n_heads=6" if world_size == 4 else "n_kv_heads=3"
    for res in ranks:
        assert res["error-odd-heads"] is not None and heads in res["error-odd-heads"]
        assert f"world_size={world_size}" in res["error-odd-heads"]
        assert res["error-odd-experts"] is not None and "moe.num_experts=3" in res["error-odd-experts"]


# ---- single-process tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name,moe", SCENARIOS)
def test_shards_partition_every_tensor(name, moe, world_size):
    args = CONFIGS[name]
    full = build_model(name).state_dict()
    for key, w in full.items():
        parts = [take_shard(w, tensor_shard(key, args, r, world_size, moe)) for r in range(world_size)]
        shard = tensor_shard(key, args, 0, world_size, moe)
        if shard.dim is None:
            assert all(p is w for p in parts)
        else:
            assert torch.equal(torch.cat(parts, dim=shard.dim), w), key


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,moe", SCENARIOS)
def test_ranks_read_their_slices_through_the_checkpoint_loader(tmp_path, name, moe, fmt):
    """What load_sharded_model does on each rank, in one process: build_local_model, then
    checkpoint.load_weights reading the slices tensor_shard names (HF q/k rows put in native order by whole
    heads) gives exactly take_shard of every full tensor."""
    args, model = CONFIGS[name], build_model(name)
    save_both_formats(model, tmp_path, name)
    files = find_checkpoint(tmp_path / f"{name}-{fmt}")
    index, full = checkpoint_index(files, args), model.state_dict()
    for rank in range(2):
        local = build_local_model(args, rank, 2, moe)
        load_weights(local, files, index, torch.float32,
                     select=lambda key, rank=rank: tensor_shard(key, args, rank, 2, moe))
        assert local.state_dict().keys() == full.keys()
        for key, w in local.state_dict().items():
            assert torch.equal(w, take_shard(full[key], tensor_shard(key, args, rank, 2, moe))), key


def test_local_args_split_heads_and_hidden_units():
    a = local_args(CONFIGS["nemo"], 4)
    assert (a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.dim, a.vocab_size) == (2, 1, 16, 16, 48, 96)
    moe = CONFIGS["mixtral"]
    assert local_args(moe, 2, "expert").hidden_dim == 48  # whole experts
    assert local_args(moe, 2, "tensor").hidden_dim == 24  # half of every expert
    expert3_w2 = "layers.1.feed_forward.experts.3.w2.weight"
    assert tensor_shard(expert3_w2, moe, 0, 2, "expert") == TensorSlice(1, 0, 0)  # lives on rank 1
    assert tensor_shard(expert3_w2, moe, 1, 2, "expert") == TensorSlice(1, 0, 48)
    assert tensor_shard(expert3_w2, moe, 1, 2, "tensor") == TensorSlice(1, 24, 48)
    assert tensor_shard("layers.0.attention.wk.weight", moe, 1, 2) == TensorSlice(0, 16, 32)


@pytest.mark.parametrize("field,value,world_size,kwargs", [
    ("n_heads", 6, 4, dict(n_heads=6, n_kv_heads=2, head_dim=8)),
    ("n_kv_heads", 2, 4, dict(n_heads=8, n_kv_heads=2)),
    ("n_kv_heads", 3, 2, dict(n_heads=6, n_kv_heads=3, head_dim=8)),
    ("hidden_dim", 50, 4, dict(hidden_dim=50)),
    ("vocab_size", 30, 4, dict(vocab_size=30)),
    ("moe.num_experts", 6, 4, dict(moe=MoeArgs(6, 2))),
    ("hidden_dim", 50, 4, dict(moe=MoeArgs(8, 2), hidden_dim=50, moe_mode="tensor")),
])
def test_non_divisible_quantities_are_named(field, value, world_size, kwargs):
    moe_mode = kwargs.pop("moe_mode", "expert")
    base = dict(dim=32, n_layers=1, n_heads=8, n_kv_heads=4, hidden_dim=64, vocab_size=64)
    args = ModelArgs(**{**base, **kwargs})
    with pytest.raises(ShardingError, match=rf"world_size={world_size} .*{field}={value} is not divisible"):
        check_divisible(args, world_size, moe_mode)
    with pytest.raises(ShardingError, match=rf"{field}={value}"):
        local_args(args, world_size, moe_mode)


def test_experts_that_do_not_divide_can_still_be_split_by_hidden_units():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=64, moe=MoeArgs(6, 2))
    with pytest.raises(ShardingError, match="moe='tensor'"):
        check_divisible(args, 4, "expert")
    assert local_args(args, 4, "tensor").hidden_dim == 16


def test_bad_moe_mode_and_world_size():
    with pytest.raises(ShardingError, match="moe must be one of"):
        check_divisible(CONFIGS["mixtral"], 2, "experts")
    with pytest.raises(ShardingError, match="world_size must be a positive integer"):
        check_divisible(CONFIGS["mixtral"], 0)


def test_loading_without_a_process_group_says_how_to_start_one(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("another test left a default process group in this process")
    with pytest.raises(RuntimeError, match="init_from_env"):
        load_sharded_model(tmp_path)


def test_init_from_env_outside_torchrun_names_the_missing_variables(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match=r"RANK.*torchrun --nproc-per-node"):
        init_from_env()


def test_local_args_of_latent_attention_and_fine_experts():
    """Heads split (the latent is not); routed experts whole with moe="expert", 1/N wide with moe="tensor"; the
    dense first layer split; the shared expert split by hidden units in both modes (build_local_model)."""
    args = CONFIGS["small4"]
    a = local_args(args, 4, "expert")
    assert (a.n_heads, a.n_kv_heads, a.mla, a.hidden_dim) == (1, 1, args.mla, 12)
    assert a.fine_moe == args.fine_moe
    assert local_args(args, 2, "tensor").fine_moe.moe_intermediate_size == 4
    for moe, routed in (("expert", 8), ("tensor", 4)):
        local = build_local_model(args, 1, 2, moe)
        ff = local.layers[1].feed_forward
        assert ff.shared_experts.w1.weight.shape == (4, 32)  # 8 units of the shared expert over 2 ranks
        widths = [e.w1.weight.shape[0] for e in ff.experts]
        assert widths == ([0] * 4 + [8] * 4 if moe == "expert" else [routed] * 8)
        assert local.layers[0].feed_forward.w1.weight.shape == (24, 32)  # the dense layer, split
        assert local.layers[1].attention.kv_b_proj.weight.shape == (2 * (8 + 6), 8)  # 2 of 4 heads
        assert local.layers[1].attention.kv_a_proj_with_mqa.weight.shape == (8 + 4, 32)  # the whole latent
    assert tensor_shard("layers.1.attention.wo.weight", args, 1, 2) == TensorSlice(1, 12, 24)  # 2 heads of v 6
    assert tensor_shard("layers.1.attention.q_b_proj.weight", args, 1, 2) == TensorSlice(0, 24, 48)
    assert tensor_shard("layers.1.feed_forward.gate.weight", args, 1, 2) == TensorSlice(None)
    bias = "layers.1.feed_forward.gate.e_score_correction_bias"
    assert tensor_shard(bias, CONFIGS["deepseek"], 1, 2) == TensorSlice(None)


@pytest.mark.parametrize("field,value,world_size,moe,fine", [
    ("fine_moe.num_experts", 6, 4, "expert", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8)),
    ("shared expert width", 6, 4, "expert", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=6)),
    ("fine_moe.moe_intermediate_size", 6, 4, "tensor",
     dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=6)),
    ("hidden_dim", 30, 4, "expert", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                                         first_k_dense_replace=1)),
])
def test_fine_experts_that_do_not_divide_are_named(field, value, world_size, moe, fine):
    args = replace(CONFIGS["small4"], hidden_dim=30, fine_moe=FineMoeArgs(**fine))
    with pytest.raises(ShardingError, match=rf"world_size={world_size} .*{re.escape(field)}.*={value} is not"):
        check_divisible(args, world_size, moe)
