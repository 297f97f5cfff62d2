"""bench/step_profile.py and bench/kernel_categories.py: kernel names from real H100 traces and our
own kernels land in their categories, busy time is the union of overlapping kernels (checked
against a microsecond-grid count), the per-step arithmetic adds up, and a CPU run of the bench on
BERT-tiny writes every category with percentages that sum to 100."""

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kernel_categories as kc  # noqa: E402

K = kc.Kernel

# (name as the profiler reports it, category). GPU names as seen in H100 traces of torch 2.11 (cuBLAS,
# FlashAttention-2, torch's CUDA kernels), ours as @triton.jit names them (kernels/*.py) or as
# csrc/*.cu declares them; CPU names are top-level aten ops and autograd nodes.
NAMES = [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "gemm"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x256x128_warpgroupsize2x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align8>"
     "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align8::Params)", "gemm"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>"
     "(cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*)", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, true, false, false, "
     "false, true, true, false, false>(pytorch_flash::Flash_fwd_params)", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, "
     "8, 2, 4, 2, false, false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 8, cutlass::bfloat16_t> "
     ">, true, false, false, false, false, false, false>(pytorch_flash::Flash_bwd_params)", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
     "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", "attention"),
    ("_attn_fwd_kernel", "attention"),
    ("_attn_bwd_kernel", "attention"),
    ("_attn_bwd_preprocess_kernel", "attention"),
    ("_add_layer_norm_fwd_kernel", "layernorm"),
    ("_add_layer_norm_bwd_kernel", "layernorm"),
    ("_finalize_kernel", "layernorm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float, "
     "c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, c10::BFloat16*)",
     "layernorm"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<c10::BFloat16, float, 32u, "
     "32u, 256u, false, true>(long, long, c10::BFloat16 const*, c10::BFloat16 const*, float const*, float "
     "const*, c10::BFloat16*, c10::BFloat16*)", "layernorm"),
    ("_fp8_amax_kernel", "fp8_cast"),
    ("_fp8_cast_kernel", "fp8_cast"),
    ("_fp8_finish_kernel", "fp8_cast"),
    ("_mlm_stats_kernel", "mlm_loss"),
    ("_mlm_grad_kernel", "mlm_loss"),
    ("_mlm_finish_kernel", "mlm_loss"),
    ("_mlm_scale_grads_kernel", "mlm_loss"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, c10::BFloat16, float, c10::BFloat16, "
     "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(c10::BFloat16*, c10::BFloat16 const*, int)",
     "mlm_loss"),
    ("void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<c10::BFloat16, float, "
     "long>(c10::BFloat16*, c10::BFloat16*, c10::BFloat16 const*, long const*, c10::BFloat16 const*, bool, "
     "long, long, long, long)", "mlm_loss"),
    ("_embeddings_fwd_kernel", "embeddings"),
    ("_embeddings_bwd_kernel", "embeddings"),
    ("_segment_block_kernel", "embeddings"),
    ("_segment_join_kernel", "embeddings"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, "
     "-2, true>(at::cuda::detail::TensorInfo<c10::BFloat16, unsigned int>, at::cuda::detail::TensorInfo<"
     "c10::BFloat16 const, unsigned int>, at::cuda::detail::TensorInfo<long const, unsigned int>, int, int, "
     "unsigned int, unsigned int, long)", "embeddings"),
    ("void at::native::(anonymous namespace)::compute_grad_weight<c10::BFloat16, float, long>(long const*, "
     "c10::BFloat16 const*, long const*, long, long, long const*, long const*, long, float*)", "embeddings"),
    ("void bias_gelu_forward_kernel<__nv_bfloat16>(__nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16*, "
     "long, long)", "bias_gelu"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
     "at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#4}::operator()() const::{lambda("
     "c10::BFloat16)#1}, std::array<char*, 2ul> >(int, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
     "at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#4}::operator()() const::{lambda("
     "c10::BFloat16)#1}, std::array<char*, 2ul>)", "bias_gelu"),
    ("void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float, unsigned int, 1, 4, "
     "bool>(at::cuda::detail::TensorInfo<c10::BFloat16 const, unsigned int>, at::cuda::detail::TensorInfo<"
     "c10::BFloat16, unsigned int>, at::cuda::detail::TensorInfo<bool, unsigned int>, unsigned int, float, "
     "at::PhiloxCudaState)", "dropout"),
    ("_lamb_phase1_kernel", "optimizer"),
    ("_lamb_phase2_kernel", "optimizer"),
    ("_lamb_finalize_kernel", "optimizer"),
    ("void lamb_phase1_kernel(Table, float const*, float const*)", "optimizer"),
    ("void sumsq_kernel(Table, float*)", "optimizer"),
    ("void reduce_slots_kernel(Table, float const*, float*)", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::"
     "ADAM_MODE)1, false>, float*, double, double, double, double, double, bool, float*, float*>(...)",
     "optimizer"),
    # Elementwise kernels whose lambdas must not pass for LAMB (nor their copies for memcpy).
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
     "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)",
     "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::direct_copy_kernel_"
     "cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#12}::operator()() const::"
     "{lambda(float)#1}, std::array<char*, 2ul> >(int, ...)", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
     "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
     "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, ...>)", "elementwise"),
    ("triton_poi_fused__to_copy_add_0", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "memcpy"),
    ("Memset (Device)", "memcpy"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", "nccl"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy_aligned16_contig<at::native::(anonymous "
     "namespace)::OpaqueType<2u>, unsigned int, 2, 128, 1>(...)", "elementwise"),
    ("void some_library::unheard_of_kernel<float>(float*)", "other"),
    # CPU: top-level ops and autograd nodes.
    ("aten::linear", "gemm"),
    ("autograd::engine::evaluate_function: AddmmBackward0", "gemm"),
    ("autograd::engine::evaluate_function: MmBackward0", "gemm"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("autograd::engine::evaluate_function: SafeSoftmaxBackward0", "attention"),
    ("autograd::engine::evaluate_function: LogSoftmaxBackward0", "mlm_loss"),
    ("autograd::engine::evaluate_function: NativeLayerNormBackward0", "layernorm"),
    ("autograd::engine::evaluate_function: EmbeddingBackward0", "embeddings"),
    ("Optimizer.step#FusedLAMB.step", "optimizer"),
    ("aten::add", "other"),
]


@pytest.mark.parametrize("name, expected", NAMES, ids=[f"{n[:40]}->{c}" for n, c in NAMES])
def test_category(name, expected):
    assert kc.category(name) == expected


def test_every_category_has_a_known_name():
    assert {c for _, c in NAMES} == set(kc.NAMES)


def grid_busy(kernels) -> int:
    """Independent reference: microseconds of an integer grid covered by any kernel."""
    return len({t for k in kernels for t in range(int(k.start_us), int(k.end_us))})


def test_busy_is_the_union_of_overlapping_kernels():
    # Stream 1: [0, 10) and [20, 30); stream 2: [5, 15) overlapping the first, [22, 24) inside the second.
    kernels = [K("a", 0, 10), K("b", 20, 30), K("c", 5, 15), K("d", 22, 24)]
    assert kc.busy_us(kernels) == 25 == grid_busy(kernels)
    assert kc.busy_us([]) == 0
    rng = random.Random(0)
    for _ in range(200):
        starts = [rng.randrange(0, 100) for _ in range(rng.randrange(1, 12))]
        kernels = [K("k", s, s + rng.randrange(0, 30)) for s in starts]
        assert kc.busy_us(kernels) == grid_busy(kernels)


def test_summary_per_step_with_overlap():
    # Two steps of 50 us wall each; a GEMM and a LayerNorm overlap by 5 us on two streams.
    kernels = [K("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", 0, 20), K("_add_layer_norm_fwd_kernel", 15, 25),
               K("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", 50, 70), K("mystery", 80, 90)]
    s = kc.summarize(kernels, wall_ms=0.1, steps=2)
    assert s["busy_ms"] == pytest.approx((25 + 20 + 10) / 2 / 1e3)
    assert s["kernel_ms"] == pytest.approx(60 / 2 / 1e3) and s["overlap_ms"] == pytest.approx(2.5e-3)
    assert s["idle_ms"] == pytest.approx((100 - 55) / 2 / 1e3) and s["wall_ms"] == pytest.approx(0.05)
    assert s["launches"] == 2
    cats = s["categories"]
    assert set(cats) == set(kc.NAMES)
    assert cats["gemm"] == {"ms": pytest.approx(0.02), "launches": 1, "pct": pytest.approx(100 * 40 / 105)}
    assert cats["layernorm"]["launches"] == 0.5 and cats["attention"] == {"ms": 0, "pct": 0, "launches": 0}
    assert sum(c["pct"] for c in cats.values()) + s["idle_pct"] == pytest.approx(100)
    assert s["non_gemm_ms"] == pytest.approx(0.05 - 0.02)
    assert [k["name"] for k in s["top_kernels"]] == [kernels[0].name, "_add_layer_norm_fwd_kernel", "mystery"]
    assert s["unmatched"] == [{"name": "mystery", "category": "other", "ms": pytest.approx(0.005), "launches": 0.5,
                               "pct": pytest.approx(100 * 10 / 105)}]


def test_summary_lists_the_longest_first_and_caps_them():
    kernels = [K(f"unknown_{i}", 0, i + 1) for i in range(20)]
    s = kc.summarize(kernels, wall_ms=1.0, steps=1)
    assert [k["name"] for k in s["top_kernels"]] == [f"unknown_{i}" for i in range(19, 4, -1)]
    assert len(s["unmatched"]) == 10 and s["unmatched"][0]["name"] == "unknown_19"
    # Kernels longer than the wall (another clock): no negative idle, and the shares still sum to 100.
    s = kc.summarize([K("x", 0, 3000)], wall_ms=2.0, steps=1)
    assert s["idle_ms"] == 0 and s["categories"]["other"]["pct"] == 100


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(wall_ms=0.0), "wall_ms must be > 0, got 0.0"),
    (dict(kernels=[K("backwards", 5, 2)]), "kernels: 'backwards' ends"),
])
def test_summary_rejects_bad_arguments(kwargs, message):
    args = dict(kernels=[K("a", 0, 1)], wall_ms=1.0, steps=1) | kwargs
    with pytest.raises(ValueError, match=message):
        kc.summarize(**args)


def event(name, device, start, end, parent=None, annotation=False, activity=None):
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                           cpu_parent=parent, is_user_annotation=annotation, activity_type=activity)


def test_kernels_from_events_keeps_device_work_only():
    top = event("aten::linear", DeviceType.CPU, 0, 10)
    events = [top, event("aten::addmm", DeviceType.CPU, 1, 9, parent=top),
              event("Optimizer.step#FusedLAMB.step", DeviceType.CPU, 10, 20, annotation=True,
                    activity="user_annotation"),
              event("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", DeviceType.CUDA, 2, 5, activity="kernel"),
              event("Memset (Device)", DeviceType.CUDA, 5, 6, activity="gpu_memset"),
              event("Optimizer.step#FusedLAMB.step", DeviceType.CUDA, 12, 30, annotation=True,
                    activity="gpu_user_annotation"),
              event("Event Sync", DeviceType.CUDA, 30, 90, activity="cuda_sync")]
    assert kc.kernels_from_events(events, "cuda") == [K("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", 2, 5),
                                                      K("Memset (Device)", 5, 6)]
    assert kc.kernels_from_events(events, "cpu") == [K("aten::linear", 0, 10),
                                                     K("Optimizer.step#FusedLAMB.step", 10, 20)]
    with pytest.raises(ValueError, match="device_type must be 'cuda' or 'cpu', got 'mps'"):
        kc.kernels_from_events(events, "mps")


@pytest.mark.slow
def test_cpu_run_writes_every_category(tmp_path, capsys):
    import step_profile

    rows = step_profile.main(["--device", "cpu", "--seq", "32", "--batch", "2", "--warmup", "1", "--steps", "2",
                              "--providers", "torch,fast_packed", "--strict", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "step_profile.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert {"device", "torch", "triton", "commit", "date", "dtype"} <= set(saved["meta"])
    ok, skipped = saved["rows"]
    assert skipped["provider"] == "fast_packed" and skipped["status"].startswith("unavailable: ")
    assert ok["status"] == "ok" and (ok["model"], ok["seq"], ok["batch"]) == ("tiny", 32, 2)
    assert set(ok["categories"]) == set(kc.NAMES) and ok["launches"] > 0
    assert sum(c["pct"] for c in ok["categories"].values()) + ok["idle_pct"] == pytest.approx(100, abs=0.01)
    # The torch backend's step on real CPU traces: its GEMMs, attention and optimizer are recognised.
    assert all(ok["categories"][c]["ms"] > 0 for c in ("gemm", "attention", "optimizer", "layernorm"))
    assert 0 < ok["busy_ms"] <= 1.01 * ok["wall_ms"] and ok["ms"] > 0
    table = (tmp_path / "step_profile.md").read_text()
    assert table.startswith("# step_profile") and "| idle (gaps) |" in table
    assert "### tiny, seq 32 x batch 2 (full lengths): torch" in table
    assert "tiny, seq 32 x batch 2 (full lengths): torch: " in capsys.readouterr().out
