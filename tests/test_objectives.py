"""Pretraining objectives on hand-made token sequences: exact outputs where the draws are scripted, and the
properties that must hold for any draw with the real seeded generator."""

import numpy as np
import pytest

from lmfleet.data.config import OBJECTIVE_TOKENS
from lmfleet.train.config import ObjectiveConfig
from lmfleet.train.objectives import (
    IGNORE,
    TOKENS,
    ObjectiveTokens,
    clm,
    denoising,
    fim,
    infill,
    make_example,
    mlm_nsp,
    permute_sentences,
    rotate,
    sample_rng,
)

# eos 0, pad 1, mask 2, sep 3, cls 4, <PRE> 5, <MID> 6, <SUF> 7, <ISNEXT> 8, <NOTNEXT> 9; text ids 10-49
T = ObjectiveTokens(eos=0, pad=1, vocab_size=50, special=tuple(range(10)), sentence_end=(20,), mask=2, sep=3, cls=4,
                    fim_prefix=5, fim_middle=6, fim_suffix=7, isnext=8, notnext=9)
X = IGNORE  # no target


class Scripted:
    """numpy Generator's methods the objectives call, answering from scripts (one list per method)."""

    def __init__(self, **script):
        self.script = {k: list(v) for k, v in script.items()}

    def _next(self, name):
        return self.script[name].pop(0)

    def random(self, size=None):
        return np.array(self._next("random")) if size is not None else self._next("random")

    def integers(self, lo, hi=None, size=None):
        value = self._next("integers")
        assert np.all((lo <= np.asarray(value)) & (np.asarray(value) < hi)), (value, lo, hi)
        return np.array(value) if size is not None else value

    def poisson(self, lam):
        return self._next("poisson")

    def permutation(self, n):
        return np.array(self._next("permutation"))

    def choice(self, a, size, replace):
        value = np.array(self._next("choice"))
        assert set(value) <= set(a.tolist()) and len(value) == size
        return value

    def done(self):
        return all(not v for v in self.script.values())


def arr(*xs):
    return np.array(xs, dtype=np.int64)


def test_the_data_stage_adds_every_objective_token():
    assert set(OBJECTIVE_TOKENS) == set(TOKENS.values())


def test_clm_shifts_and_ignores_pads():
    x = clm(arr(10, 11, 0, 12, 1, 1), arr(0, 1, 2, 0, 0, 0), pad=1)
    assert x.inputs.tolist() == [10, 11, 0, 12, 1] and x.positions.tolist() == [0, 1, 2, 0, 0]
    assert x.targets.tolist() == [11, 0, 12, X, X]


@pytest.mark.parametrize("spm, first", [(False, [5, 10, 7, 13, 6, 11, 12, 0]), (True, [5, 7, 13, 6, 10, 11, 12, 0])])
def test_fim_psm_and_spm(spm, first):
    """Document 1 [10 11 12 13 EOS] cut at offsets 1 and 3: prefix [10], middle [11 12], suffix [13]; document 2
    is left as it is (its draw is above the rate) and the three sentinels push its tokens out of the sample."""
    tokens = arr(10, 11, 12, 13, 0, 20, 21, 0)
    rng = Scripted(random=[0.1, 0.2 if spm else 0.9, 0.7], integers=[[3, 1]])
    x = fim(tokens, arr(0, 1, 2, 3, 4, 0, 1, 2), rng, T, rate=0.5, spm_rate=0.5)
    assert rng.done()
    assert x.inputs.tolist() == first[:7] and x.targets.tolist() == first[1:]  # loss on every token
    assert x.positions.tolist() == list(range(7))


def test_fim_keeps_every_token_and_adds_three_sentinels_per_document():
    tokens = np.concatenate([np.arange(10, 40), [0], np.arange(10, 20), [0], [1] * 8])
    positions = np.concatenate([np.arange(31), np.arange(11), [0] * 8])
    for seed in range(20):
        x = fim(np.concatenate([tokens, [1] * 8]), np.concatenate([positions, [0] * 8]), sample_rng(seed, 0, 0), T,
                rate=1.0, spm_rate=0.5)
        kept = np.concatenate([x.inputs, x.targets[-1:]])
        assert np.bincount(kept[kept >= 10], minlength=50).tolist() == np.bincount(tokens[tokens >= 10],
                                                                                   minlength=50).tolist()
        assert [int((kept == s).sum()) for s in (5, 6, 7)] == [2, 2, 2]


def test_span_infill_masks_poisson_spans_as_one_token_each():
    rng = Scripted(poisson=[2, 0], integers=[1, 4])  # a span of 2 at 1, then (0 -> 1) a span of 1 at 4
    assert infill(arr(10, 11, 12, 13, 14, 15), rng, mask=2, ratio=0.5, lam=3.0).tolist() == [10, 2, 13, 2, 15]
    rng = Scripted(poisson=[3], integers=[2])  # overlapping / adjacent runs are one mask
    assert infill(arr(10, 11, 12, 13, 14, 15), rng, mask=2, ratio=0.5, lam=3.0).tolist() == [10, 11, 2, 15]


def test_sentence_permutation_and_rotation():
    piece = arr(10, 20, 11, 12, 20, 13)
    assert permute_sentences(piece, Scripted(permutation=[[2, 0, 1]]), np.array([20])).tolist() == [
        13, 10, 20, 11, 12, 20]
    assert rotate(arr(10, 11, 12, 13), Scripted(integers=[1])).tolist() == [11, 12, 13, 10]


def test_denoising_is_corrupted_separator_original_with_loss_on_the_original():
    """A 16-token sample: a 7-token document becomes [rotated, SEP, original] (15 tokens, one segment); the next
    document does not fit in the one token left, which is padding."""
    tokens = arr(10, 11, 12, 13, 14, 15, 0, 30, 31, 32, 0, 1, 1, 1, 1, 1)
    positions = arr(0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0, 0, 0, 0, 0)
    x = denoising(tokens, positions, Scripted(integers=[2]), T, rotate)
    seq = [12, 13, 14, 15, 0, 10, 11, 3, 10, 11, 12, 13, 14, 15, 0, 1]
    assert x.inputs.tolist() == seq[:15] and x.positions.tolist() == list(range(15))
    assert x.targets.tolist() == [X] * 7 + [10, 11, 12, 13, 14, 15, 0, X]


def test_denoising_fills_the_sample_with_pieces():
    tokens = np.concatenate([np.arange(10, 50), [0]])  # one 41-token document in a 41-token sample
    x = make_example(ObjectiveConfig(kind="span_infill"), tokens, np.arange(41), sample_rng(0, 3, 0), T)
    full = np.concatenate([x.inputs, x.targets[-1:]])
    seps = np.flatnonzero(full == 3)
    assert len(seps) >= 2  # pieces of at most 20 tokens: the document needs more than one
    originals = x.targets[x.targets != X]
    assert originals.tolist() == list(range(10, 10 + len(originals)))  # the text, in order, after the separators


def test_mlm_masks_80_10_10():
    tokens = arr(10, 11, 12, 13, 14, 0, 15, 1, 1)
    rng = Scripted(choice=[[0, 2, 4]], random=[[0.5, 0.85, 0.95]], integers=[[42]])
    x = make_example(ObjectiveConfig(kind="mlm", mask_prob=0.5), tokens, arr(0, 1, 2, 3, 4, 5, 0, 0, 0), rng, T)
    assert x.inputs.tolist() == [2, 11, 42, 13, 14, 0, 15, 1]  # mask, a random token, unchanged
    assert x.targets.tolist() == [10, X, 12, X, 14, X, X, X]  # not shifted; EOS and pads never chosen
    assert x.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 0]


def test_mlm_statistics_over_many_samples():
    tokens = np.concatenate([np.arange(10, 50), np.arange(10, 50), [0]])
    chosen, masked, same = 0, 0, 0
    for i in range(300):
        x = make_example(ObjectiveConfig(kind="mlm"), tokens, np.arange(81), sample_rng(0, i, 0), T)
        at = x.targets != X
        chosen += at.sum()
        masked += (x.inputs[at] == 2).sum()
        same += (x.inputs[at] == x.targets[at]).sum()
        assert at.sum() == 12 and not np.isin(x.inputs, [0, 1, 3, 4, 5, 6, 7, 8, 9]).any()  # round(0.15 x 80)
    # 3,600 chosen: 80% masked, 10% kept (+ 1/40 of the random 10% drawing the token itself), one sd ~0.005
    assert abs(masked / chosen - 0.8) < 0.02 and 0.085 < same / chosen < 0.12, (masked / chosen, same / chosen)


def test_mlm_nsp_pairs():
    tokens = arr(10, 20, 11, 20, 12, 0, 1, 1, 1, 1, 1, 1, 1)
    positions = arr(0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0)
    # sentences [10 20] [11 20] [12]; A = the first one, IsNext; one token (index 5 of the pair) masked
    rng = Scripted(integers=[1], random=[0.9, [0.1]], choice=[[5]])
    x = mlm_nsp(tokens, positions, rng, T, prob=0.15, random_fraction=0.5, other=None)
    assert x.inputs.tolist() == [4, 10, 20, 3, 11, 2, 12, 3, 1, 1, 1, 1]
    assert x.targets.tolist() == [8, X, X, X, X, 20, X, X, X, X, X, X]
    assert x.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0]
    other = (arr(30, 31, 32, 33, 0, 1), arr(0, 1, 2, 3, 4, 0))
    rng = Scripted(integers=[2], random=[0.3, [0.95]], choice=[[1]])  # NotNext: B is the other sample's document
    x = mlm_nsp(tokens, positions, rng, T, prob=0.15, random_fraction=0.5, other=lambda r: other)
    assert x.inputs.tolist() == [4, 10, 20, 11, 20, 3, 30, 31, 32, 33, 3, 1]
    assert x.targets[0] == 9 and x.targets[1] == 10


def test_corruption_is_seeded_by_seed_sample_and_epoch():
    tokens = np.concatenate([np.arange(10, 50), [0]])
    cfg = ObjectiveConfig(kind="span_infill")

    def ex(*key):
        return make_example(cfg, tokens, np.arange(41), sample_rng(*key), T).inputs.tolist()

    assert ex(0, 5, 1) == ex(0, 5, 1)
    assert ex(0, 5, 1) != ex(0, 5, 2) and ex(0, 5, 1) != ex(0, 6, 1) and ex(0, 5, 1) != ex(1, 5, 1)


def test_objective_keys_belong_to_their_kind():
    with pytest.raises(ValueError, match="mask_ratio: not a key of objective kind 'fim'"):
        ObjectiveConfig(kind="fim", mask_ratio=0.2)
    again = ObjectiveConfig.model_validate(ObjectiveConfig(kind="fim", rate=0.9).model_dump())  # a dumped config
    assert again.rate == 0.9
