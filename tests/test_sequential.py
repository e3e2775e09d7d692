"""The SASRec transformer (rerank.models.sasrec) and its Recommender wrapper (rerank.models.sequential).

Small synthetic data only; the Beauty-scale run lives in benchmarks/beauty_sasrec.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank.models.sasrec import SASRec, SASRecConfig
from rerank.models.recommender import ModelLoadError, load_model, save_model
from rerank.models.sequential import SequentialRecommender, left_pad

N_ITEMS = 30


@pytest.fixture(params=["end", "relative"])
def position(request) -> str:
    return request.param


def tiny_module(**overrides) -> SASRec:
    torch.manual_seed(0)
    config = SASRecConfig(n_items=N_ITEMS, item_capacity=N_ITEMS + 6, n_attributes=5, max_attributes=2,
                          d_model=16, n_layers=2, n_heads=2, max_len=8, dropout=0.0, attn_dropout=0.0, **overrides)
    module = SASRec(config)
    attrs = torch.tensor([[0, 0]] + [[1 + i % 5, 0] for i in range(N_ITEMS)] + [[0, 0]] * 5)
    module.set_item_attributes(attrs)
    # non-trivial weights everywhere (padding rows stay as they are)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.eval()


def chain_sequences(n_users: int, length: int, rng: np.random.Generator) -> list[list[int]]:
    """Item i is always followed by i+1 (cyclic over 1..N_ITEMS), from a random start."""
    return [[int((start + k) % N_ITEMS) + 1 for k in range(length)]
            for start in rng.integers(0, N_ITEMS, size=n_users)]


def test_score_shapes_and_masked_padding_column(position):
    module = tiny_module(position=position)
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    types = (seq > 0).long() * 4
    cands = torch.tensor([[5, 6, 7], [1, 2, 0]])
    assert module.score_candidates(seq, types, cands).shape == (2, 3)
    full = module.score_all(seq, types)
    assert full.shape == (2, N_ITEMS + 1)  # spare capacity rows are not scored
    assert torch.isneginf(full[:, 0]).all() and torch.isfinite(full[:, 1:]).all()
    # candidate scores are the matching columns of the full ranking
    picked = module.score_candidates(seq, types, torch.tensor([[5, 6, 7], [1, 2, 3]]))
    torch.testing.assert_close(picked, full.gather(1, torch.tensor([[5, 6, 7], [1, 2, 3]])))


def test_unknown_candidate_gets_the_lowest_finite_score():
    module = tiny_module()
    seq = torch.tensor([[1, 2, 3]])
    out = module.score_candidates(seq, None, torch.tensor([[4, 0, 9, 12]]))
    known = out[0, [0, 2, 3]]
    assert torch.isfinite(out).all()
    assert out[0, 1] < known.min()


def test_causal_masking_later_items_do_not_change_earlier_states(position):
    module = tiny_module(position=position)
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    changed = seq.clone()
    changed[0, 6:] = torch.tensor([20, 21])
    h1, h2 = module(seq), module(changed)
    torch.testing.assert_close(h1[:, :6], h2[:, :6])
    assert not torch.allclose(h1[:, 6:], h2[:, 6:])


def test_left_padding_does_not_change_scores(position):
    module = tiny_module(position=position)
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[0, 0, 0, 0, 3, 4, 5]])
    torch.testing.assert_close(module.score_all(short), module.score_all(padded))
    # and the pad tokens themselves (whatever they hold) are never attended to
    assert torch.isfinite(module(padded)).all()


def test_history_longer_than_max_len_reads_the_last_max_len(position):
    module = tiny_module(position=position)
    long = torch.arange(1, 13).unsqueeze(0)  # 12 items, max_len 8
    torch.testing.assert_close(module.score_all(long), module.score_all(long[:, -8:]))


def test_event_types_change_scores():
    module = tiny_module()
    seq = torch.tensor([[3, 4, 5]])
    views, buys = torch.full_like(seq, 1), torch.full_like(seq, 4)
    assert not torch.allclose(module.score_all(seq, views), module.score_all(seq, buys))


def test_grow_items_scores_new_items_from_their_attributes():
    module = tiny_module()
    seq = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="item_capacity"):
        module.grow_items(N_ITEMS + 10)
    module.grow_items(N_ITEMS + 2, torch.tensor([[2, 0], [3, 0]]))
    full = module.score_all(seq)
    assert full.shape == (1, N_ITEMS + 3)
    # a new item's representation = its embedding row + the mean of its attribute embeddings
    table = module.item_table()
    torch.testing.assert_close(table[N_ITEMS + 1], module.item_emb.weight[N_ITEMS + 1] + module.attr_emb.weight[2])
    assert module.score_candidates(seq, None, torch.tensor([[N_ITEMS + 2]])).isfinite().all()


def test_loss_is_finite_with_label_smoothing_and_decreases():
    module = tiny_module()
    module.train()
    seq = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    targets = torch.tensor([[0, 2, 3, 4], [6, 7, 8, 9]])
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = module.loss(seq, None, targets, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_left_pad_keeps_the_most_recent_items():
    out = left_pad([np.array([1, 2, 3, 4]), np.array([7]), np.array([], dtype=np.int64)], 3)
    np.testing.assert_array_equal(out, [[2, 3, 4], [0, 0, 7], [0, 0, 0]])


# ---- the Recommender wrapper ------------------------------------------------------------------

SMALL = dict(d_model=32, n_heads=2, max_len=10, dropout=0.1, attn_dropout=0.1, batch_size=64,
             eval_every=2, patience=3, lr=5e-3, warmup_epochs=0.5, progress=False, device="cpu", max_minutes=0)


@pytest.fixture
def chain_dataset(make_dataset):
    rng = np.random.default_rng(0)
    attributes = {i: [1 + (i - 1) // 10] for i in range(1, N_ITEMS + 1)}
    return make_dataset(chain_sequences(200, 8, rng), attributes=attributes, n_items=N_ITEMS)


def test_create_rejects_unknown_options(chain_dataset):
    with pytest.raises(ValueError, match="no_such_option"):
        SequentialRecommender.create(chain_dataset, no_such_option=1)
    with pytest.raises(ValueError, match="'epochs'"):
        SequentialRecommender.create(chain_dataset, epochs="many")


def test_learns_a_planted_sequence_and_beats_popularity(chain_dataset):
    from rerank.data.dataset import leave_one_out
    from rerank.models.evaluate import evaluate
    from rerank.models.recommender import model_class
    from rerank.models.train_log import TrainLog

    split = leave_one_out(chain_dataset)
    model = SequentialRecommender.create(chain_dataset, seed=0, epochs=10, **SMALL)
    log = TrainLog()
    model.fit(chain_dataset, split, log)
    test = evaluate(model, chain_dataset, split, which="test", ks=(1, 10))
    pop = model_class("pop").create(chain_dataset, seed=0)
    pop.fit(chain_dataset, split)
    pop_test = evaluate(pop, chain_dataset, split, which="test", ks=(1, 10))
    assert test["hr@1"] > 0.9, test
    assert test["ndcg@10"] > pop_test["ndcg@10"] + 0.5, (test, pop_test)
    epochs = [r for r in log.records if "epoch" in r]
    assert epochs and all({"loss", "seconds"} <= set(r) for r in epochs)
    assert any("valid_ndcg@10" in r for r in epochs)
    assert epochs[-1]["loss"] < epochs[0]["loss"]


def test_save_load_round_trip_gives_identical_scores(chain_dataset, tmp_path):
    model = SequentialRecommender.create(chain_dataset, seed=1, **SMALL)
    histories = [np.array([1, 2, 3]), np.array([7]), np.array([4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])]
    cands = np.array([[4, 5, 0], [8, 9, 10], [16, 1, 2]])
    before_all, before_c = model.score(histories), model.score(histories, cands)
    path = save_model(model, tmp_path / "m", chain_dataset)
    loaded = load_model(path)
    assert isinstance(loaded, SequentialRecommender) and loaded.n_items == N_ITEMS
    np.testing.assert_array_equal(loaded.score(histories), before_all)
    np.testing.assert_array_equal(loaded.score(histories, cands), before_c)
    assert before_all.dtype == np.float32 and np.isneginf(before_all[:, 0]).all()
    assert before_c[0, 2] < before_c[0, :2].min()  # unknown candidate: lowest finite score


def test_score_is_independent_of_batch_composition(chain_dataset):
    model = SequentialRecommender.create(chain_dataset, seed=2, **SMALL)
    histories = [np.array([1, 2, 3]), np.array([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])]
    together = model.score(histories)
    alone = np.concatenate([model.score(histories[:1]), model.score(histories[1:])])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_load_refuses_weights_that_do_not_match_the_config(chain_dataset, tmp_path):
    import json

    model = SequentialRecommender.create(chain_dataset, seed=0, **SMALL)
    path = save_model(model, tmp_path / "m", chain_dataset)
    config = json.loads((path / "config.json").read_text())
    config["sasrec"]["d_model"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="weights.pt"):
        load_model(path)
    config["sasrec"]["d_model"] = 32
    config["sasrec"]["bogus"] = 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="bogus"):
        load_model(path)


def test_batches_cover_every_user_once_with_balanced_positions(chain_dataset):
    from rerank.data.dataset import leave_one_out

    model = SequentialRecommender.create(chain_dataset, seed=0, **{**SMALL, "batch_size": 16})
    inputs, types, targets, lengths = model._training_arrays(leave_one_out(chain_dataset))
    assert ((targets > 0).sum(1) == lengths).all() and ((inputs > 0).sum(1) == lengths).all()
    # the target at each position is the next input item
    real = inputs[:, :-1] > 0
    np.testing.assert_array_equal(targets[:, :-1][real], inputs[:, 1:][real])
    batches = model._batches(lengths, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(len(lengths)))
    budget = 16 * lengths.mean()
    assert all(lengths[b].sum() <= budget + lengths.max() for b in batches)


def test_time_budget_stops_after_a_validated_epoch_and_keeps_the_best_weights(chain_dataset):
    from rerank.data.dataset import leave_one_out
    from rerank.models.train_log import TrainLog

    options = {**SMALL, "max_minutes": 1e-6, "eval_every": 5}
    model = SequentialRecommender.create(chain_dataset, seed=0, epochs=50, **options)
    log = TrainLog()
    model.fit(chain_dataset, leave_one_out(chain_dataset), log)
    epochs = [r for r in log.records if "epoch" in r]
    done = log.records[-1]
    assert len(epochs) == 1 and "valid_ndcg@10" in epochs[0]  # the last epoch is validated
    assert done["stop"] == "max_minutes" and done["best_epoch"] == 1


def test_the_frozen_item_table_follows_weight_updates(make_dataset):
    import torch

    from rerank.models.sequential import SequentialRecommender

    dataset = make_dataset([[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]], attributes={1: [1], 2: [1, 2], 3: [2]})
    model = SequentialRecommender.create(dataset, seed=0, d_model=8, n_layers=1, n_heads=1, max_len=5, epochs=1,
                                         progress=False, device="cpu")
    module = model.module
    first = module.frozen_item_table()
    assert module.frozen_item_table() is first  # same weights: not recomputed
    torch.testing.assert_close(first, module.item_table().detach())
    with torch.no_grad():
        module.item_emb.weight.mul_(2.0)  # an in-place update, as an optimizer step makes
    second = module.frozen_item_table()
    assert second is not first
    torch.testing.assert_close(second, module.item_table().detach())
    before = model.score([np.array([1, 2])], np.array([[3, 4]]))
    with torch.no_grad():
        module.attr_emb.weight.add_(1.0)
    after = model.score([np.array([1, 2])], np.array([[3, 4]]))
    assert not np.allclose(before, after)  # the scores see the new attribute embeddings
