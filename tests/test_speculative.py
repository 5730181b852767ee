"""Speculative Jacobi decoding: its distribution is plain sampling's, checked exactly on a toy model (every
sequence's probability enumerated), and its bookkeeping on the tiny generator (window 1 = plain sampling token
for token, greedy = greedy, the KV cache after rollbacks = an uncached forward)."""

import itertools
from dataclasses import dataclass

import pytest
import torch

from parti import speculative
from parti.errors import PartiError
from parti.generator import build_generator
from parti.sampling import SamplingParams, generate
from parti.speculative import generate_speculative, speculative_sample
from tests.test_generator import condition  # the same conditions as the cached step's tests

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ---- a toy AR model with a KV cache, and its exact distribution --------------------------------------------

V, T, GRID = 5, 6, 3  # 5 codes, 6 positions (a 2 x 3 grid): 15625 sequences
BOS = V


def _prefix_ids(inputs: torch.Tensor) -> torch.Tensor:
    """(N, n) inputs (BOS first) -> (N, n) an id of each prefix inputs[:, :j + 1] (base V + 1 digits)."""
    ids, h = torch.empty_like(inputs), torch.zeros_like(inputs[:, 0])
    for j in range(inputs.shape[1]):
        h = h * (V + 1) + inputs[:, j]
        ids[:, j] = h
    return ids


class Toy:
    """logits at position t = a random table's entry for (t, the prefix of inputs 0..t): one table for the
    conditional rows and one for the null rows (guidance). The model reads its inputs from its own cache,
    written at each pass's positions and never cleared: a stale entry that the sampler fails to overwrite
    changes the logits, as a stale KV entry would."""

    def __init__(self, tables: torch.Tensor, *, batch: int, window: int, guided: bool = True):
        self.tables, self.batch, self.window, self.guided = tables, batch, window, guided
        self.rows = 2 * batch if guided else batch
        self.seq_len, self.grid_size, self.num_codes, self.bos, self.device = T, GRID, V, BOS, torch.device("cpu")
        self.cache = torch.randint(V + 1, (self.rows, T + window - 1))  # garbage until written

    def __call__(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        pos = start[:, None] + torch.arange(tokens.shape[1])
        rows = torch.arange(self.rows)[:, None]
        self.cache[rows, pos] = tokens
        n = int(pos.max()) + 1
        ids = _prefix_ids(self.cache[:, :n]).gather(1, pos) % self.tables.shape[2]
        branch = (rows >= self.batch).long() if self.guided else torch.zeros_like(rows)
        return self.tables[branch, pos.clamp_max(T - 1), ids]  # (rows, L, V)


def make_tables(seed: int = 0, scale: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, T, (V + 1) ** T, V, generator=g) * scale  # (branch, position, prefix id, code)


def reference_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float64 probabilities of guided logits (..., V) after temperature, top-k, top-p: written apart from
    `parti.sampling.filter_logits` on purpose."""
    z = logits.double() / params.temperature
    if params.top_k is not None:
        kth = z.topk(params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = z.softmax(dim=-1)
    if params.top_p is not None:
        order = p.argsort(dim=-1, descending=True)
        sorted_p = p.gather(-1, order)
        drop_sorted = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        p = p.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p


def exact_distribution(tables: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """P(sequence) for all V**T sequences (index: the sequence read as a base-V number), from per-prefix
    conditionals."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (V**T, T), in index order
    inputs = torch.cat([torch.full((len(seqs), 1), BOS), seqs[:, :-1]], dim=1)
    ids = _prefix_ids(inputs)
    t = torch.arange(T)
    cond, uncond = tables[0, t, ids].double(), tables[1, t, ids].double()  # (N, T, V)
    p = reference_filter(uncond + params.guidance_scale * (cond - uncond), params)
    return p.gather(-1, seqs[..., None])[..., 0].prod(dim=-1)


def sequence_index(codes: torch.Tensor) -> torch.Tensor:
    return (codes * V ** torch.arange(T - 1, -1, -1)).sum(-1)


@dataclass
class Fit:
    p_value: float
    tv: float  # total variation between the sample's frequencies and the exact distribution
    tv_noise: float  # its expected value for an exact sampler of this many draws
    impossible: int  # draws of sequences of probability 0


def goodness_of_fit(codes: torch.Tensor, probs: torch.Tensor) -> Fit:
    """Pearson's chi-square of the sampled sequences against `probs`; cells expecting < 5 draws are pooled."""
    n = codes.shape[0]
    counts = torch.bincount(sequence_index(codes), minlength=len(probs)).double()
    expected = n * probs
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = torch.tensor(float(keep.sum() - 1))
    p_value = float(torch.special.gammaincc(df / 2, stat / 2))
    tv = 0.5 * float((counts / n - probs).abs().sum())
    tv_noise = 0.5 * float((2 * probs * (1 - probs) / (torch.pi * n)).sqrt().sum())
    return Fit(p_value, tv, tv_noise, int(counts[probs == 0].sum()))


GUIDED = SamplingParams(guidance_scale=3.0, temperature=0.7, top_k=3)
NUCLEUS = SamplingParams(guidance_scale=3.0, temperature=0.7, top_k=3, top_p=0.8)
DRAWS = 200_000


def sjd_draws(params: SamplingParams, *, window: int, batch: int = DRAWS, calls: int = 1, seed: int = 0,
              tables: torch.Tensor | None = None):
    """`calls` runs of SJD on the toy, each of `batch` rows -> (codes (calls * batch, T), passes per row)."""
    tables = make_tables() if tables is None else tables
    g = torch.Generator().manual_seed(seed)
    codes, forwards = [], []
    for _ in range(calls):
        out = speculative_sample(Toy(tables, batch=batch, window=window), params, generator=g)
        codes.append(out.codes)
        forwards.append(out.forwards)
    return torch.cat(codes), torch.cat(forwards).double()


def assert_exact(codes: torch.Tensor, params: SamplingParams) -> Fit:
    """The sample fits the exact distribution. An exact sampler's TV over 2e5 draws of this toy is
    tv_noise +- 17% (sd), at most 1.7 x tv_noise in 400 multinomial samples."""
    fit = goodness_of_fit(codes, exact_distribution(make_tables(), params))
    assert fit.impossible == 0, f"draws of probability 0: {fit}"
    assert fit.p_value > 1e-3, f"chi-square p-value {fit.p_value:.3g}: {fit}"
    assert fit.tv < 2 * fit.tv_noise, f"total variation {fit.tv:.4f}: {fit}"
    return fit


# ---- the distribution ---------------------------------------------------------------------------------------

def test_the_fit_tells_plain_sampling_from_a_wrong_distribution():
    """The yardstick: plain AR sampling (select_next) of the toy fits; the toy without top-k does not."""
    from parti.sampling import select_next

    tables, g = make_tables(), torch.Generator().manual_seed(1)
    toy = Toy(tables, batch=DRAWS, window=1)
    codes = torch.empty(DRAWS, T, dtype=torch.long)
    token = torch.full((2 * DRAWS, 1), BOS)
    for t in range(T):
        logits = toy(token, torch.full((2 * DRAWS,), t))[:, 0]
        codes[:, t] = select_next(logits[DRAWS:] + 3.0 * (logits[:DRAWS] - logits[DRAWS:]), GUIDED, g)
        token = torch.cat([codes[:, t], codes[:, t]])[:, None]
    assert_exact(codes, GUIDED)
    wrong = goodness_of_fit(codes, exact_distribution(tables, SamplingParams(guidance_scale=3.0, temperature=0.7)))
    assert wrong.p_value < 1e-6


@pytest.mark.parametrize("coupled", [False, True], ids=["plain", "coupled"])
@pytest.mark.parametrize("init", ["left", "random"])
@pytest.mark.parametrize("window", [2, T])
@pytest.mark.parametrize("params", [GUIDED, NUCLEUS], ids=["topk", "topk-topp"])
def test_sjd_draws_plain_samplings_distribution(params, window, init, coupled):
    """2e5 rows in one batch: every row at its own commit pointer (ragged acceptance)."""
    params = SamplingParams(**{**vars(params), "sjd_init": init, "sjd_coupled": coupled})
    codes, forwards = sjd_draws(params, window=window)
    assert_exact(codes, params)
    if window > 2:
        assert forwards.mean() < T - 0.5  # drafts were accepted: the test saw acceptances, not only residuals


@pytest.mark.parametrize("batch, calls", [(1, 1000), (4, 500)])
def test_small_batches_draw_the_same_distribution(batch, calls):
    """Batches of 1 and 4 prompts (fewer draws: one call per batch), plain and coupled."""
    for i, coupled in enumerate((False, True)):
        params = SamplingParams(**{**vars(NUCLEUS), "sjd_coupled": coupled})
        codes, _ = sjd_draws(params, window=T, batch=batch, calls=calls, seed=10 + i)
        fit = goodness_of_fit(codes, exact_distribution(make_tables(), params))
        assert fit.impossible == 0 and fit.p_value > 1e-3, fit


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_small_batches_at_full_size(batch):
    params = SamplingParams(**{**vars(NUCLEUS), "sjd_coupled": True})
    codes, _ = sjd_draws(params, window=T, batch=batch, calls=DRAWS // batch)
    assert_exact(codes, params)


def test_a_missing_residual_is_caught(monkeypatch):
    """Planted bug: a rejected draft's token drawn from p instead of norm(max(0, p - q))."""
    monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
    params = SamplingParams(**{**vars(GUIDED), "sjd_coupled": True})
    codes, _ = sjd_draws(params, window=T)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_exact(codes, params)


def test_retesting_accepted_drafts_is_caught(monkeypatch):
    """Planted bug, as in batched reference implementations: a batch of 4 advances by its slowest row, and
    the drafts another row had accepted stay in its window with their old q, to be tested again."""
    real = speculative._slide

    def shared_pointer(w, c, outcome, jacobi, p):
        c_row = c.clone()
        c = torch.where(c > 0, c.masked_fill(c == 0, T).view(-1, 4).amin(1, keepdim=True).expand(-1, 4).reshape(-1), 0)
        L = p.shape[1]
        slots = torch.arange(L)
        # Slots a row committed past the shared pointer keep their draft and old q (not p), and are not fresh.
        kept = (slots >= c[:, None]) & (slots < c_row[:, None] - 1)  # accepted drafts
        drafts = w.buf.gather(1, 1 + w.n[:, None] + slots)
        old_q, old_fresh = w.q.clone(), w.fresh.clone()
        first = real(w, c, outcome, torch.where(kept, drafts, jacobi), torch.where(kept[..., None], old_q, p))
        shift = slots + c[:, None]
        kept_after = kept.gather(1, shift.clamp_max(L - 1)) & (shift < L)
        w.fresh = torch.where(kept_after, old_fresh.gather(1, shift.clamp_max(L - 1)), w.fresh)
        return first

    monkeypatch.setattr(speculative, "_slide", shared_pointer)
    codes, _ = sjd_draws(GUIDED, window=T)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_exact(codes, GUIDED)


# ---- on the generator ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return build_generator("tiny").eval()




@pytest.mark.parametrize("params", [SamplingParams(guidance_scale=3.0),
                                    SamplingParams(guidance_scale=2.0, temperature=0.7, top_k=20, top_p=0.9),
                                    SamplingParams(guidance_scale=1.0, top_k=5)])
@pytest.mark.parametrize("init", ["left", "random"])
def test_a_window_of_one_is_plain_sampling_token_for_token(gen, params, init):
    """With no drafts, each pass draws one token with plain sampling's one uniform: the same stream."""
    ctx, mask = condition(gen)
    params = SamplingParams(**{**vars(params), "sjd_window": 1, "sjd_init": init})
    want = generate(gen, ctx, mask, params=params, generator=torch.Generator().manual_seed(5))
    got = generate_speculative(gen, ctx, mask, params=params, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got.codes, want)
    assert got.forwards.tolist() == [gen.config.seq_len] * 3 and got.accepted.tolist() == [3 * gen.config.seq_len]


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("window", [2, 5, 64])
@pytest.mark.parametrize("init, coupled", [("left", False), ("random", False), ("left", True)])
def test_greedy_sjd_is_greedy_sampling(gen, scale, window, init, coupled):
    ctx, mask = condition(gen)
    params = SamplingParams(temperature=0.0, guidance_scale=scale, sjd_window=window, sjd_init=init,
                            sjd_coupled=coupled)
    got = generate_speculative(gen, ctx, mask, params=params)
    assert torch.equal(got.codes, generate(gen, ctx, mask, params=params))
    assert (got.forwards < gen.config.seq_len).all()  # greedy Jacobi iterates converge ahead of the pointer


@pytest.mark.parametrize("coupled", [False, True])
def test_the_cache_after_rollbacks_is_an_uncached_forward(gen, coupled):
    """Every code's logits, as recorded when it was committed, are those of one uncached forward over the final
    codes (conditional rows with the text, null rows with the null condition): rejected drafts left nothing."""
    ctx, mask = condition(gen)
    params = SamplingParams(guidance_scale=3.0, temperature=0.5, top_k=5, sjd_window=8, sjd_coupled=coupled)
    out = generate_speculative(gen, ctx, mask, params=params, generator=torch.Generator().manual_seed(3),
                               record_logits=True)
    assert (out.accepted[1:].sum() > 0) and (out.accepted[0] > 0)  # acceptances and rejections both happened
    null, null_mask = gen.null_condition(3, ctx.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(out.logits[:3], gen(out.codes, ctx, mask), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.logits[3:], gen(out.codes, null, null_mask), atol=1e-5, rtol=1e-4)


def test_the_report_adds_up(gen):
    ctx, mask = condition(gen)
    window = 6
    out = generate_speculative(gen, ctx, mask, params=SamplingParams(top_k=3, temperature=0.3, sjd_window=window),
                               generator=torch.Generator().manual_seed(0))
    T_ = gen.config.seq_len
    assert out.codes.shape == (3, T_) and 0 <= out.codes.min() and out.codes.max() < gen.config.num_codes
    assert out.accepted.shape == (window,) and int(out.accepted.sum()) == int(out.forwards.sum())
    # each pass commits its accepted drafts plus one token
    assert int((out.accepted * torch.arange(1, window + 1)).sum()) == 3 * T_
    assert out.tokens_per_forward == pytest.approx(3 * T_ / float(out.forwards.sum()))
    assert not out.codes.is_inference()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_bad_window_is_refused(bad):
    with pytest.raises(PartiError, match="sjd_window"):
        SamplingParams(sjd_window=bad)


def test_a_bad_init_is_refused():
    with pytest.raises(PartiError, match="sjd_init"):
        SamplingParams(sjd_init="above")


def test_the_pipeline_samples_with_sjd_when_asked(tiny_folders):
    """`Pipeline` (and `parti sample --sjd-window`) take the window from SamplingParams: greedy codes equal plain
    greedy ones; sampled ones are codes of the tokenizer's grid."""
    from parti.pipeline import load_pipeline

    pipe = load_pipeline(tiny_folders / "gen", device="cpu", dtype="fp32", compile=False)
    greedy = SamplingParams(temperature=0, guidance_scale=2.0)
    want = pipe(["red hair", "a hat"], greedy, return_codes=True).codes
    got = pipe(["red hair", "a hat"], SamplingParams(**{**vars(greedy), "sjd_window": 4}), return_codes=True).codes
    assert torch.equal(got, want)
    out = pipe(["red hair"], SamplingParams(top_k=8, sjd_window=16, sjd_coupled=True), num_images_per_prompt=3,
               seed=1, return_codes=True)
    assert out.codes.shape == (3, 8, 8) and out.images.shape[0] == 3


def test_the_window_left_unset_is_the_measured_choice(tiny_folders, monkeypatch):
    """Unset, the window is AUTO_WINDOW's: on a CPU in fp32, SJD for one prompt at a time, plain sampling for
    more, and plain sampling where compiling was asked for."""
    from parti import pipeline
    from parti.speculative import auto_window

    assert auto_window(torch.device("cpu"), torch.float32, 1) > 1
    assert auto_window(torch.device("cpu"), torch.float32, 4) == 1
    assert auto_window(torch.device("cpu"), torch.bfloat16, 1) == 1
    calls = []
    real = pipeline.generate_speculative
    monkeypatch.setattr(pipeline, "generate_speculative", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    pipe = pipeline.load_pipeline(tiny_folders / "gen", device="cpu", dtype="fp32", compile=False)
    pipe(["red hair", "a hat"], SamplingParams(), batch_size=1)
    pipe(["red hair", "a hat"], SamplingParams(), batch_size=2)
    pipe(["red hair"], SamplingParams(sjd_window=1))
    assert calls == [1, 1]
