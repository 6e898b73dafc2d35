"""CPU inference paths: ONNX export and cache, ``precision: auto``, and the hop the box can hold."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from test_inference import engine_for, real_windows
from streamer.errors import StreamerError
from streamer.inference import capacity, cpu
from streamer.inference.engine import InferenceEngine
from streamer.model import load_model
from streamer.settings import ConfigError, parse_config

onnx = pytest.importorskip("onnxruntime")

EXPORT_TOLERANCE = 1e-4  # ONNX Runtime fp32 against our torch fp32, probabilities
SOURCE = {"sources": [{"name": "a", "type": "file", "path": "x.wav"}]}


def fake_cpuinfo(tmp_path, model: str, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\nprocessor\t: 1\nmodel name\t: {model}\n")
    return path


def test_cpu_features_decide_the_candidates(tmp_path):
    epyc = cpu.cpu_features(fake_cpuinfo(tmp_path, "AMD EPYC 7B13", "fpu sse avx fma avx2"))
    assert epyc.model == "AMD EPYC 7B13" and "avx2" in epyc.flags and not epyc.bf16_units
    assert epyc.describe() == "AMD EPYC 7B13 avx2, no bf16 units"
    assert cpu.candidates(epyc, onnx=True) == ["fp32", "onnx-fp32", "onnx-int8", "onnx-int8-all"]  # bf16 is emulated here: 10× slower
    assert cpu.candidates(epyc, onnx=False) == ["fp32", "int8"]
    xeon = cpu.cpu_features(fake_cpuinfo(tmp_path, "Intel Xeon Platinum 8481C", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile"))
    assert xeon.bf16_units and "bf16" in cpu.candidates(xeon, onnx=True)
    assert "amx_bf16" in xeon.describe() and xeon.key() != epyc.key()
    this = cpu.cpu_features()  # this machine's, whatever it is
    assert this.model and this.capability


@pytest.mark.parametrize("config", [dict(max_length=128), dict(max_length=160, frequency_stride=16, time_stride=16),
                                    dict(max_length=120, frequency_stride=12, time_stride=14, qkv_bias=False)],
                         ids=["10-10", "16-16", "12-14-nobias"])
def test_exported_runtime_model_equals_ours(tiny_checkpoint, config):
    directory, _ = tiny_checkpoint(num_labels=527, **config)
    loaded = load_model(directory)
    feats = torch.stack(real_windows(4, max_length=config["max_length"]))
    with torch.inference_mode():
        ours = loaded.model.probabilities(loaded.model(feats)).numpy()
    fp32 = cpu.build_forward("onnx-fp32", loaded, threads=1)
    got = loaded.model.probabilities(fp32(feats)).numpy()  # a batch of 4: the batch axis is dynamic
    assert np.abs(got - ours).max() <= EXPORT_TOLERANCE
    int8 = cpu.build_forward("onnx-int8", loaded, threads=1)
    got8 = np.concatenate([loaded.model.probabilities(int8(feats[i:i + 1])).numpy() for i in range(len(feats))])
    assert 0 < np.abs(got8 - ours).max() <= cpu.ACCURACY_BOUND  # quantised (not the fp32 file), and close


def test_int8_quantises_qkv_fc1_and_the_later_fc2_only(tiny_checkpoint):
    """qkv and fc1 of every layer, fc2 of the later half; the last layer's qkv is sliced for its two
    queries (not a constant weight), proj, the patch embedding and the classifier stay fp32."""
    import onnx as onnx_lib

    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, num_hidden_layers=4)
    loaded = load_model(directory)
    where = cpu.cache_dir(loaded, cpu.model_hash(loaded))
    nodes = cpu.int8_nodes(cpu.export_onnx(loaded, where))
    expected = [f"/blocks.{i}/attn/qkv/MatMul" for i in range(3)] + [f"/blocks.{i}/mlp/fc1/MatMul" for i in range(4)] \
        + ["/blocks.2/mlp/fc2/MatMul", "/blocks.3/mlp/fc2/MatMul"]
    assert sorted(nodes) == sorted(expected), nodes
    int8 = cpu.export_onnx(loaded, where, int8=True)
    assert cpu.INT8_RECIPE in int8.name  # a new recipe never reuses an old quantised file
    ops = [n.op_type for n in onnx_lib.load(str(int8)).graph.node]
    assert ops.count("MatMulInteger") == len(nodes) and "ConvInteger" not in ops  # nothing else quantised
    every = cpu.export_onnx(loaded, where, int8="onnx-int8-all")  # the other recipe `auto` tries: every GEMM
    assert every != int8 and ops.count("MatMulInteger") < [n.op_type for n in
                                                           onnx_lib.load(str(every)).graph.node].count("MatMulInteger")


def test_export_is_cached_next_to_the_checkpoint_or_in_the_user_cache(tiny_checkpoint, tmp_path, monkeypatch):
    directory, _ = tiny_checkpoint(max_length=64)
    loaded = load_model(directory)
    digest = cpu.model_hash(loaded)
    where = cpu.cache_dir(loaded, digest)
    assert where == directory / cpu.CACHE_SUBDIR / digest
    first = cpu.export_onnx(loaded, where, int8=True)
    stamp = first.stat().st_mtime_ns
    assert cpu.export_onnx(loaded, where, int8=True) == first and first.stat().st_mtime_ns == stamp  # not redone
    assert cpu.model_hash(load_model(directory)) == digest  # same weights, same key
    other, _ = tiny_checkpoint(max_length=64, seed=1)
    assert cpu.model_hash(load_model(other)) != digest  # retrained weights never reuse an old export
    # a checkpoint directory we cannot write into: the user cache directory instead
    (other / cpu.CACHE_SUBDIR).write_text("not a directory")
    monkeypatch.setenv(cpu.USER_CACHE_ENV, str(tmp_path / "user-cache"))
    loaded_other = load_model(other)
    assert cpu.cache_dir(loaded_other, "abc") == tmp_path / "user-cache" / "abc"


def test_precision_auto_picks_a_valid_path_on_this_cpu_and_caches_it(tiny_checkpoint, caplog, monkeypatch):
    directory, _ = tiny_checkpoint(max_length=128, num_labels=527)
    feats = real_windows(3, max_length=128)
    reference = engine_for(directory, "fp32").predict(feats)
    monkeypatch.setattr(cpu, "SMALL_MODEL_GFLOP", 0.0)  # a tiny model: compare every path all the same
    with caplog.at_level(logging.INFO, logger="streamer.inference"):
        engine = engine_for(directory, "auto", threads=torch.get_num_threads())
    choice = engine.choice
    assert engine.precision == choice.path in cpu.candidates(cpu.cpu_features())
    assert choice.max_abs_dp <= cpu.ACCURACY_BOUND and not choice.cached
    assert {r.path for r in choice.results} == set(cpu.candidates(cpu.cpu_features()))
    assert all(r.seconds_per_window > 0 and r.max_abs_dp is not None for r in choice.results)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision auto: ")]
    assert any(f"precision auto: {choice.path}, " in m and "check windows; CPU " in m for m in lines), lines
    assert np.abs(engine.predict(feats) - reference).max() <= cpu.ACCURACY_BOUND
    assert engine.seconds_per_window(1) == choice.seconds_per_window  # measured at the choice, no extra work
    again = engine_for(directory, "auto", threads=torch.get_num_threads())
    assert again.choice.cached and again.precision == engine.precision  # next start: no timing
    assert "(cached choice)" in again.choice.log_line()


def test_precision_auto_keeps_fp32_for_a_small_model_without_exporting(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=64)
    assert load_model(directory).config.window_gflop() < cpu.SMALL_MODEL_GFLOP
    engine = engine_for(directory, "auto")
    assert engine.precision == "fp32" and engine.choice.reason.startswith("a small model")
    assert not (directory / cpu.CACHE_SUBDIR).exists()  # nothing exported, nothing timed
    assert engine.choice.log_line().startswith("precision auto: fp32, a small model (0.00 GFLOP per window)")
    assert engine.seconds_per_window(1) > 0  # then measured when asked


def test_window_gflop_of_the_audioset_models():
    from streamer.model.config import ASTConfig

    full = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    ten, sixteen = ASTConfig(**full), ASTConfig(**full, frequency_stride=16, time_stride=16)
    assert sixteen.num_patches == 512 and ten.num_patches == 1212
    assert 200 < ten.window_gflop() < 270 and 2.5 < ten.window_gflop() / sixteen.window_gflop() < 3.5  # "about 3× cheaper"


def test_every_cpu_precision_scores_within_the_bound(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128, num_labels=527)
    feats = real_windows(3, max_length=128)
    reference = engine_for(directory, "fp32").predict(feats)
    for precision in ("int8", "onnx-fp32", "onnx-int8"):
        engine = engine_for(directory, precision, max_batch=2)
        got = engine.predict(feats)
        assert np.abs(got - reference).max() <= cpu.ACCURACY_BOUND, precision
        single = np.concatenate([engine.predict(feats[i:i + 1]) for i in range(len(feats))])
        assert np.abs(got - single).max() <= 1e-5, precision  # batch-mates never change a window's scores
        assert engine.seconds_per_window(2) > 0


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_prepacked_linears_give_the_models_scores(tiny_checkpoint, act):
    """The bf16 path's oneDNN-prepacked layers (fp32 here: the same swap, any CPU) change no score."""
    import copy

    directory, _ = tiny_checkpoint(max_length=128, num_labels=527, hidden_act=act)
    loaded = load_model(directory)
    feats = torch.stack(real_windows(3, max_length=128))
    model = copy.deepcopy(loaded.model)
    layers = len(model.blocks)
    assert cpu.prepack_linears(model, torch.float32) == 4 * layers  # qkv, proj, fc1, fc2 (not the last qkv), head
    assert type(model.blocks[-1].attn.qkv) is torch.nn.Linear  # the last layer still slices its queries
    assert (type(model.blocks[0].mlp.act) is torch.nn.Identity) == act.startswith("gelu")  # GELU fused into fc1
    with torch.inference_mode():
        ours = loaded.model.probabilities(loaded.model(feats))
        packed = loaded.model.probabilities(model(feats))
    assert (packed - ours).abs().max() <= 1e-5
    engine = engine_for(directory, "bf16")  # the daemon's bf16 path packs exactly where oneDNN has native bf16
    assert any(isinstance(m, cpu.PackedLinear) for m in engine.model.modules()) == cpu.bf16_packing_supported()
    assert np.abs(engine.predict(list(feats)) - ours.numpy()).max() <= cpu.ACCURACY_BOUND
    if cpu.bf16_packing_supported():  # a CPU with native bf16 (AMX, AVX-512): packed bf16 against plain bf16
        plain = cpu.bf16_forward(copy.deepcopy(loaded.model), packed=False)
        fast = cpu.bf16_forward(copy.deepcopy(loaded.model), packed=True)
        with torch.inference_mode():
            assert (loaded.model.probabilities(fast(feats)) - ours).abs().max() <= cpu.ACCURACY_BOUND
            assert (loaded.model.probabilities(plain(feats)) - ours).abs().max() <= cpu.ACCURACY_BOUND


def test_unknown_or_unavailable_precisions_are_refused_clearly(tiny_checkpoint, monkeypatch):
    directory, _ = tiny_checkpoint(max_length=64)
    with pytest.raises(StreamerError, match="unknown precision 'onnx'"):
        InferenceEngine(load_model(directory), "cpu", "onnx")
    monkeypatch.setattr(cpu, "onnxruntime_available", lambda: False)  # as where it is not installed
    with pytest.raises(StreamerError, match="precision onnx-int8 needs ONNX Runtime: pip install onnxruntime"):
        InferenceEngine(load_model(directory), "cpu", "onnx-int8")
    assert cpu.candidates(cpu.cpu_features())[-1] == "int8"  # auto then falls back to torch's int8


def test_sustainable_and_auto_hop():
    # 1.95 s per window (fp32 on a 2-core EPYC): one stream cannot hold hop 1 s
    assert not capacity.sustainable(1.95, 1, 1.0)
    assert capacity.sustainable(0.6, 1, 1.0) and not capacity.sustainable(0.71, 1, 1.0)  # 30 % headroom
    assert capacity.sustainable(0.71, 1, 1.0, headroom=0.0)
    assert capacity.auto_hop(1.95, 1) == 2.79  # 1.95 / 0.7 = 2.7857 → the next 10 ms
    assert capacity.sustainable(1.95, 1, 2.79) and not capacity.sustainable(1.95, 1, 2.78)
    assert capacity.auto_hop(0.01, 4) == 0.5  # never below 0.5 s
    assert capacity.auto_hop(0.5, 3) == 2.15  # 1.5 / 0.7 = 2.1429
    assert capacity.auto_hop(5.0, 4) == capacity.HOP_MAX_S  # cannot: the longest hop, and a warning
    for spw, streams in ((0.123, 1), (0.0071, 50), (0.9, 2), (0.35, 3)):
        hop = capacity.auto_hop(spw, streams, max_batch=8)
        assert round(hop * 100) == pytest.approx(hop * 100) and capacity.sustainable(spw, streams, hop, 8)
        assert hop == 0.5 or not capacity.sustainable(spw, streams, round(hop - 0.01, 2), 8)
    with pytest.raises(ValueError):
        capacity.sustainable(0.0, 1, 1.0)


def test_hop_warning_says_the_numbers_and_the_fix():
    assert capacity.hop_warning(0.5, 1, 1.0) is None
    line = capacity.hop_warning(1.95, 1, 1.0, path="onnx-int8")
    assert "\n" not in line
    assert "hop 1 s" in line and "1.95 s per window (onnx-int8)" in line and "195%" in line and "limit 70%" in line
    assert "set hop: 2.79 or hop: auto" in line and "ast-finetuned-audioset-16-16" in line
    assert "use fewer streams" in capacity.hop_warning(5.0, 4, 1.0)


def test_hop_warning_offers_the_cheaper_model_only_to_a_costlier_one():
    from streamer.model.config import ASTConfig

    full = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    ten, sixteen = ASTConfig(**full).window_gflop(), ASTConfig(**full, frequency_stride=16, time_stride=16).window_gflop()
    assert abs(sixteen - capacity.CHEAPER_MODEL_GFLOP) < 2  # the constant is the 16-16 model's own cost
    line = capacity.hop_warning(1.13, 1, 1.0, path="onnx-int8", model_gflop=ten, auto_precision=True)
    assert "ast-finetuned-audioset-16-16" in line and "~2.7× less work" in line
    assert "precision: auto" not in line  # auto already chose onnx-int8: nothing to gain by asking for it
    same = capacity.hop_warning(0.74, 1, 1.0, path="onnx-fp32", model_gflop=sixteen, auto_precision=True)
    assert same is not None and "16-16" not in same and "cheaper model" not in same  # it is already in use
    assert "set hop: 1.06 or hop: auto" in same
    assert "precision: auto" in capacity.hop_warning(0.74, 1, 1.0, path="fp32", model_gflop=sixteen)


def test_settings_precision_auto_is_the_default_and_hop_auto_parses():
    cfg = parse_config(SOURCE)
    assert cfg.model.precision == "auto" and not cfg.hop_auto and cfg.hop == 1.0
    cfg = parse_config({**SOURCE, "hop": "auto", "model": {"precision": "onnx-int8"}})
    assert cfg.hop_auto and cfg.model.precision == "onnx-int8"
    with pytest.raises(ConfigError, match="hop.*expected a number of seconds .* or auto, got 'fast'"):
        parse_config({**SOURCE, "hop": "fast"})
    with pytest.raises(ConfigError, match="precision"):
        parse_config({**SOURCE, "model": {"precision": "int4"}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_auto_on_a_gpu_is_bf16_and_onnx_paths_are_refused_there(tiny_checkpoint):
    directory, _ = tiny_checkpoint(max_length=128)
    engine = engine_for(directory, "auto", device="cuda")
    assert engine.precision == "bf16" and engine.choice is None and engine.fused
    for precision in ("int8", "onnx-fp32", "onnx-int8"):
        with pytest.raises(StreamerError, match=f"precision {precision} is for the CPU"):
            engine_for(directory, precision, device="cuda")


def test_cpu_bench_measures_every_path_in_one_interleaved_run(tiny_checkpoint):
    from conftest import real_clips
    from streamer.benchmark import bench_cpu, format_cpu_table

    directory, _ = tiny_checkpoint(max_length=1024, num_labels=527)
    cheaper, _ = tiny_checkpoint(max_length=1024, num_labels=527, frequency_stride=16, time_stride=16, seed=1)
    result = bench_cpu(directory, real_clips(per_label=1)[:4], threads=1, rounds=3, cheaper=cheaper)
    names = [r["path"] for r in result["rows"]]
    assert names[:2] == ["transformers fp32", "ours fp32"] and "ours onnx-int8" in names and "ours onnx-int8 16-16" in names
    rows = {r["path"]: r for r in result["rows"]}
    assert result["timed_rounds"] == 2 and all(r["s_per_window"] > 0 and r["speedup_vs_transformers_fp32"] > 0 for r in rows.values())
    assert rows["transformers fp32"]["max_abs_dp"] <= 1e-4 and rows["ours onnx-fp32"]["max_abs_dp"] <= 1e-4
    assert rows["ours onnx-int8 16-16"]["accuracy_reference"] == "ours fp32 16-16"
    table = format_cpu_table({"machine": "here", "torch": torch.__version__, "cpu_paths": result})
    assert "| ours onnx-int8 |" in table and "vs transformers fp32" in table
