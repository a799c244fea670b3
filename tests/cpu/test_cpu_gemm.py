"""Multi-row bf16 linears computed in fp32 on widened weight blocks (dstp.cpu.gemm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dstp.cpu import features as cpu_features
from dstp.cpu import gemm as cpu_gemm
from dstp.cpu import kernels as cpu_kernels
from dstp.cpu.kernels import linear_2d
from dstp.server.cli import build_parser, check_args
from dstp.server.serve import _engine_config

# both builds' widening GEMM, where this CPU runs them (the AVX2 build stays 256-bit here)
BUILDS = [
    pytest.param(
        "avx512_bf16",
        marks=pytest.mark.skipif(not cpu_features.has_avx512_bf16(), reason="no AVX512-BF16"),
    ),
    pytest.param(
        "avx2", marks=pytest.mark.skipif(not cpu_features.has_avx2_fma(), reason="no AVX2+FMA")
    ),
]


@pytest.fixture
def compute_dtype():
    """Sets --cpu-compute-dtype for one test and puts back the default."""
    yield cpu_gemm.set_compute_dtype
    cpu_gemm.set_compute_dtype("auto")


@pytest.fixture(params=["dstp GEMM", "MKL blocks"])
def widening(request, monkeypatch):
    """Each fp32 path of widened_linear in turn: dstp's GEMM (where its kernels build) and
    MKL's on widened blocks (as where settle timed it faster, or without the kernels)."""
    if request.param == "dstp GEMM" and cpu_kernels.gemm_widened_op() is None:
        pytest.skip("dstp's CPU kernels do not build here")
    monkeypatch.setattr(cpu_gemm, "_blocks_faster", request.param == "MKL blocks")
    monkeypatch.setattr(cpu_gemm, "_widening_timed", True)  # a load's settle keeps it
    return request.param


def _bf16_within_rounding(got: torch.Tensor, exact: torch.Tensor, magnitude=None) -> None:
    """Each value is the fp32 result rounded to bf16, give or take one bf16 step, and the
    fp32 sums' own rounding in another order of additions: 2^-18 of ``magnitude`` (the sums
    of |x w|, where values cancel to near zero)."""
    step = exact.abs().clamp_min(1e-3) * 2**-7
    if magnitude is not None:
        step = step + magnitude * 2**-18
    assert ((got.float() - exact).abs() <= step).all()


def _sums_of_magnitudes(x: torch.Tensor, w: torch.Tensor, b=None) -> torch.Tensor:
    """|x| |w|^T (+ |b|): the scale of an fp32 sum's rounding, whatever the order."""
    return F.linear(x.float().abs(), w.float().abs(), None if b is None else b.float().abs())


@pytest.mark.parametrize(
    "rows,out_features,in_features,bias",
    [
        (2, 64, 128, False),
        (7, 1000, 300, True),  # output rows not a multiple of the block
        (33, 4097, 2048, True),
        (3, 5, 300_000, False),  # one weight row wider than a block: one row per block
        (300, 17, 64, True),
    ],
)
def test_matches_fp32_math_rounded_once(widening, rows, out_features, in_features, bias):
    torch.manual_seed(rows)
    x = torch.randn(rows, in_features).bfloat16()
    w = torch.randn(out_features, in_features).bfloat16()
    b = torch.randn(out_features).bfloat16() if bias else None
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = cpu_gemm.widened_linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    _bf16_within_rounding(got, exact, _sums_of_magnitudes(x, w, b))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize(
    "rows,out_features,in_features",
    [
        (1, 5, 7),  # one row in a half tile, one panel of 5 weight rows, an odd K
        (16, 12, 64),  # a half tile (AVX512) or one whole tile (AVX2) exactly
        (17, 13, 301),  # a tile with one live row past a half; a panel of one row left
        (40, 193, 1030),  # 32 + a half tile of 8; two row blocks (192 + 1); three K blocks
        (257, 25, 33),  # two passes of 256 x rows, the second of one row
        (6, 9, 0),  # no columns: the bias alone
    ],
)
def test_dstp_gemm_is_fp32_math_rounded_once(build, rows, out_features, in_features):
    """Both builds' kernel at every edge of its tiling: x tiles, weight panels and blocks, K
    blocks, odd K (packed two columns at a time)."""
    gemm = cpu_kernels._build(build).gemm_widened_bf16
    torch.manual_seed(rows)
    x = torch.randn(rows, in_features).bfloat16()
    w = torch.randn(out_features, in_features).bfloat16()
    b = torch.randn(out_features).bfloat16()
    exact = F.linear(x.float(), w.float(), b.float())
    _bf16_within_rounding(gemm(x, w, b), exact, _sums_of_magnitudes(x, w, b))
    exact = F.linear(x.float(), w.float())
    _bf16_within_rounding(gemm(x, w, None), exact, _sums_of_magnitudes(x, w))


@pytest.mark.parametrize("build", BUILDS)
def test_a_nan_stays_in_its_row_and_rows_past_m_add_nothing(build):
    """Each x row is its own sums: a NaN in row 3 makes row 3 NaN (a quiet NaN, as PyTorch
    rounds one) and nothing else; the zero rows padding the last tile are never written."""
    gemm = cpu_kernels._build(build).gemm_widened_bf16
    x, w = torch.randn(21, 64).bfloat16(), torch.randn(30, 64).bfloat16()
    x[3, 5] = float("nan")
    got = gemm(x, w, None)
    assert got[3].isnan().all() and not got[torch.arange(21) != 3].isnan().any()
    assert got.shape == (21, 30)
    with pytest.raises(RuntimeError, match="columns"):
        gemm(torch.randn(4, 63).bfloat16(), w, None)


def test_a_strided_weight_view():
    w = torch.randn(64, 256).bfloat16()[:, ::2]
    x = torch.randn(4, 128).bfloat16()
    _bf16_within_rounding(cpu_gemm.widened_linear(x, w), F.linear(x.float(), w.float()))


@pytest.mark.parametrize(
    "flags,setting,widens",
    [
        ({"avx2", "fma"}, "auto", True),  # AVX2-only EPYC: bf16 GEMM is emulated
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, "auto", False),  # Zen 4
        ({"avx2", "fma", "avx512f", "amx_bf16"}, "auto", False),  # Sapphire Rapids
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, "float32", True),
        ({"avx2", "fma"}, "bfloat16", False),
    ],
)
def test_the_choice_follows_the_cpu_and_the_flag(
    monkeypatch, compute_dtype, flags, setting, widens
):
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset(flags))
    compute_dtype(setting)
    assert cpu_gemm.computes_in_fp32() is widens
    assert ("widened" in cpu_gemm.describe()) is widens


@pytest.mark.parametrize(
    "bf16_s,widened_s,other_ranks_vote,widens",
    [
        (1.6, 1.0, 1, True),  # oneDNN's bf16 at 0.61x fp32 (a KVM Xeon without AMX)
        (1.05, 1.0, 1, False),  # a near tie keeps oneDNN's bf16: no flip between runs
        (0.8, 1.0, 1, False),  # bf16 dots pay (Zen 4, AMX)
        (1.6, 1.0, 0, False),  # another rank measured otherwise: all ranks round alike
    ],
)
def test_auto_settles_by_measuring_where_the_cpu_has_bf16_dots(
    monkeypatch, compute_dtype, bf16_s, widened_s, other_ranks_vote, widens
):
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx2", "fma", "avx512_bf16"}))
    times = iter([bf16_s, widened_s])
    monkeypatch.setattr(cpu_gemm, "median_seconds", lambda run: next(times))
    monkeypatch.setattr(cpu_gemm, "_widening_timed", True)  # dstp's GEMM or MKL's: timed
    compute_dtype("auto")
    assert not cpu_gemm.computes_in_fp32()  # before measuring: the flag rule
    cpu_gemm.settle(lambda vote: min(vote, other_ranks_vote))
    assert cpu_gemm.computes_in_fp32() is widens
    assert ("measured" in cpu_gemm.describe()) is widens
    cpu_gemm.settle(lambda vote: 1 / 0)  # settled once per process: no second measurement
    compute_dtype("auto")  # a new setting forgets the measurement
    assert not cpu_gemm.computes_in_fp32()


@pytest.mark.parametrize(
    "flags,setting",
    [({"avx2", "fma"}, "auto"), ({"avx512_bf16"}, "float32"), ({"avx512_bf16"}, "bfloat16")],
)
def test_settle_measures_only_an_open_choice(monkeypatch, compute_dtype, flags, setting):
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu_gemm, "median_seconds", lambda run: 1 / 0)
    monkeypatch.setattr(cpu_gemm, "_widening_timed", True)
    compute_dtype(setting)
    before = cpu_gemm.computes_in_fp32()
    votes = []
    cpu_gemm.settle(lambda vote: votes.append(vote) or 0)
    assert cpu_gemm.computes_in_fp32() is before
    # "auto" without a bf16 dot still meets the other ranks' vote (for widening): no hang
    # between ranks on unlike CPUs; an explicit setting never votes
    assert votes == ([1] if setting == "auto" else [])


def test_settle_times_the_real_gemms(monkeypatch, compute_dtype, caplog):
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(cpu_gemm, "PROBE_SHAPE", (64, 256, 256))
    monkeypatch.setattr(cpu_gemm, "_widening_timed", False)
    monkeypatch.setattr(cpu_gemm, "_blocks_faster", False)
    compute_dtype("auto")
    with caplog.at_level("INFO", logger="dstp"):
        cpu_gemm.settle()
    assert "widened fp32" in caplog.text and "x oneDNN bf16's rate" in caplog.text
    if cpu_kernels.gemm_widened_op() is not None or cpu_gemm._blocks_faster:
        assert "dstp's widening GEMM measured at" in caplog.text


@pytest.mark.parametrize(
    "times,vote,others_vote,blocks",
    [
        ([1.0, 1.0, 1.0, 1.0], 0, 1, False),  # a tie keeps dstp's GEMM (it alone pays below 56)
        ([1.2, 1.0, 1.2, 1.0], 1, 1, True),  # MKL's 1.2x faster at both sizes, on every rank
        ([1.2, 1.0, 1.0, 1.0], 0, 1, False),  # ... but at one of them only
        ([1.2, 1.0, 1.2, 1.0], 1, 0, False),  # another rank measured otherwise
    ],
)
def test_mkl_blocks_replace_dstp_gemm_only_where_they_time_faster(
    monkeypatch, compute_dtype, times, vote, others_vote, blocks
):
    """Kernel, blocks at 64 rows, then at 256: MKL's blocks only if faster at both on every
    rank; timed once per process, the ranks meeting in the vote whatever they measured."""
    if cpu_kernels.gemm_widened_op() is None:
        pytest.skip("dstp's CPU kernels do not build here")
    monkeypatch.setattr(cpu_gemm, "_widening_timed", False)
    monkeypatch.setattr(cpu_gemm, "_blocks_faster", False)
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx2", "fma"}))  # no bf16 dot
    timed = iter(times)
    monkeypatch.setattr(cpu_gemm, "median_seconds", lambda run: next(timed))
    compute_dtype("auto")
    votes = []
    cpu_gemm.settle(lambda vote: votes.append(vote) or min(vote, others_vote))
    assert votes == [1, vote, 1]  # together; this rank's measurement; "auto" (no bf16 dot)
    assert cpu_gemm.widens(cpu_gemm.MIN_ROWS - 1) is not blocks
    assert ("dstp GEMM" in cpu_gemm.describe()) is not blocks
    cpu_gemm.settle(lambda vote: 1 / 0)  # a second load in the same process: no collective
    compute_dtype("auto")


def test_linear_2d_widens_from_a_few_rows(monkeypatch, compute_dtype):
    monkeypatch.setattr(cpu_kernels, "_few_rows_fma", False)  # their limit: MIN_ROWS
    calls = []
    real = cpu_gemm.widened_linear
    monkeypatch.setattr(cpu_gemm, "widened_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    w = torch.randn(64, 128).bfloat16()
    compute_dtype("float32")
    linear_2d(torch.randn(2, cpu_gemm.MIN_ROWS, 128).bfloat16(), w)  # a 3-D batch flattens
    linear_2d(torch.randn(1, 128).bfloat16(), w)  # one row: the GEMV, never widened
    few = cpu_gemm.MIN_ROWS - 1
    linear_2d(torch.randn(few, 128).bfloat16(), w)  # the few-row kernel's (or F.linear's)
    linear_2d(torch.randn(4, 128), w.float())  # fp32 weights: F.linear
    w.requires_grad_(True)
    with torch.enable_grad():
        linear_2d(torch.randn(4, 128).bfloat16(), w)  # training: F.linear's backward
    assert calls == [(2 * cpu_gemm.MIN_ROWS, 128)]
    compute_dtype("bfloat16")
    x = torch.randn(5, 128).bfloat16()
    assert torch.equal(linear_2d(x, w.detach()), F.linear(x, w.detach()))
    assert len(calls) == 1


def test_unknown_compute_dtype_names_the_flag():
    with pytest.raises(ValueError, match="--cpu-compute-dtype"):
        cpu_gemm.set_compute_dtype("fp8")


def _checked(argv: list[str]):
    args = build_parser().parse_args(argv)
    check_args(args, world_size=1)
    return args


def test_the_flag_reaches_the_engine_config():
    args = _checked(["--cpu-compute-dtype", "float32", "--dtype", "bfloat16"])
    assert _engine_config(args, "some/model").cpu_compute_dtype == "float32"
    args = _checked(["--dtype", "bfloat16"])
    assert _engine_config(args, "some/model").cpu_compute_dtype == "auto"


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    from tests.helpers.tiny_models import llama_config, save_random_model

    config = llama_config(
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, intermediate_size=352
    )
    return save_random_model(config, tmp_path_factory.mktemp("bf16") / "model")


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)


def test_the_model_through_widened_weights_is_as_close_to_hf_as_bf16_compute(
    bf16_model, monkeypatch, compute_dtype, widening
):
    """Oracle: HF unsharded at fp32 on the same bf16-rounded weights. dstp widening (its
    GEMM, or MKL's on blocks, several per weight: TILE_BYTES shrunk) stays as close to it as
    HF's own bf16."""
    import dstp
    from tests.helpers.hf_reference import load_reference

    monkeypatch.setattr(cpu_gemm, "TILE_BYTES", 4096)
    exact_model = load_reference(bf16_model)
    hf_bf16 = load_reference(bf16_model).to(torch.bfloat16)
    exact_model.load_state_dict({k: v.float() for k, v in hf_bf16.state_dict().items()})
    gen = torch.Generator().manual_seed(0)
    # 40 rows: widened blocks; 5 and 20 rows: the few-row kernel where the CPU has AVX2
    for ids in (torch.randint(3, 256, (1, n), generator=gen) for n in (40, 5, 20)):
        exact = _logprobs(exact_model, ids)
        hf_error = (_logprobs(hf_bf16, ids) - exact).abs().max()
        for setting in ("float32", "bfloat16"):
            compute_dtype(setting)
            ours = dstp.load(str(bf16_model), torch.bfloat16)
            error = (_logprobs(ours, ids) - exact).abs().max()
            assert error <= 1.5 * hf_error + 0.02, (setting, ids.shape, error, hf_error)
