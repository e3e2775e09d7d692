"""Online learning on the simulator, in one process: how much, how fast, at what settings.

    python benchmarks/online_learning_sim.py [--requests 6000] [--lr 1e-3] [--trainable all|items]
        [--batch-size 64] [--warmup-steps 50] [--guard-margin 0.05] [--labels click,cart,purchase]
        [--post-views] [--seed 4000] [--json]

The live benchmark (benchmarks/experiments_sim.py --only online) answers "does the arm with its
own trainer beat the frozen arm" through Serve, Redis and the readout, minutes a run, with the
noise of observed clicks. This one answers the tuning question in seconds, with no noise from the
ranking side: the same simulated shoppers (rerank.clients.simulate, after the shop's successors were
re-drawn) see the LEARNER's list; for every request the frozen model's list for the same user,
same candidates, is scored too, and both lists get their ground-truth P(click) from the choice
model. The learner is the trainer's own code (rerank.online.trainer.IncrementalTrainer + rerank.online.guard.PublishGuard):
1 in 10 examples held out for the guard (anchored on the offline model), steps on full batches,
a candidate published (or refused and reset) every `--publish-every` requests, as the OnlineLoop
does. What it leaves out: Redis, the stream, the feature store (histories are kept here, as the
store keeps them) and the ranking rules (lists are the top k by model score).

Prints JSON: per window of requests, the two lists' mean true CTR and the uplift; keeps it in
`--out` (benchmarks/results/online_learning_sim.json) under `--name`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rerank.infra.progress import progress_bar  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--trainable", default="all", choices=["all", "items"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--guard-margin", type=float, default=0.05)
    parser.add_argument("--labels", default="click,cart,purchase", help="event types trained as labels")
    parser.add_argument("--post-views", action="store_true",
                        help="users also send a view of every list item they examine")
    parser.add_argument("--publish-every", type=int, default=150, help="requests between candidates (~2 s at 75 req/s)")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--seed", type=int, default=4000)
    parser.add_argument("--name", default="", help="key of this run in the results file (default: from the settings)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "online_learning_sim.json")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from deployments.local import DEMO_DATA, DEMO_MODEL, ensure_demo_data, ensure_model
    from rerank.data.dataset import EVENT_CODE
    from rerank.online.config import OnlineConfig
    from rerank.online.examples import Example
    from rerank.online.guard import PublishGuard
    from rerank.online.trainer import IncrementalTrainer
    from rerank.models.recommender import load_model
    from rerank.clients.simulate import (ChoiceModel, CandidateMix, Drift, ShopTruth, click_probability, draw_candidates,
                                 maybe_drift, new_user, react, user_schedule)

    data = ensure_demo_data(DEMO_DATA)
    ensure_model(data, DEMO_MODEL)
    truth = ShopTruth.from_dataset(data).with_new_successors(seed=7)
    frozen, learner = load_model(DEMO_MODEL), load_model(DEMO_MODEL)
    serving = copy.deepcopy(learner)
    config = OnlineConfig(lr=args.lr, batch_size=args.batch_size, guard_margin=args.guard_margin,
                          trainable=args.trainable, warmup_steps=args.warmup_steps,
                          target_types=tuple(args.labels.split(",")))
    trainer, guard = IncrementalTrainer(learner, config), PublishGuard(config)
    guard.anchor = copy.deepcopy(frozen)  # the offline baseline, as the loop's guard_anchor
    choice, drift, mix = ChoiceModel(), Drift(), CandidateMix()
    rng = np.random.default_rng(args.seed)
    users = [new_user(truth, f"u{i}", rng) for i in range(args.users)]
    histories = {u.user_id: ([], []) for u in users}  # item_idx, event codes: what the store would hold
    schedule = user_schedule(args.users, args.requests, 0.8, rng)
    stages = (["view"] if args.post_views else []) + ["click", "cart", "purchase"]
    batch: list[Example] = []
    examples = refusals = published = 0
    window = {"learner": [], "frozen": []}
    windows = []

    def top(model, history, candidates: np.ndarray, k: int = 10) -> np.ndarray:
        seq, types = (np.asarray(h[-50:], dtype=np.int64) for h in history)
        return candidates[np.argsort(-model.score([seq], candidates[None, :], [types])[0], kind="stable")[:k]]

    for i in progress_bar(range(args.requests), desc="requests", enabled=not args.json):
        req_rng = np.random.default_rng([args.seed, i])
        user = users[schedule[i]]
        history = histories[user.user_id]
        maybe_drift(truth, user, drift, req_rng)
        candidates = draw_candidates(truth, user, 100, mix, req_rng, choice.memory)
        shown, shown_frozen = top(serving, history, candidates), top(frozen, history, candidates)
        frozen_attract = choice.attractiveness(truth, user, shown_frozen)
        window["frozen"].append(click_probability(choice.examination(10), frozen_attract))
        impression = react(truth, choice, user, candidates, shown, req_rng)
        window["learner"].append(click_probability(impression.examine, impression.attract))
        outcome = {"view": impression.outcome.examined, "click": impression.outcome.clicked,
                   "cart": impression.outcome.carted, "purchase": impression.outcome.purchased}
        for position, item in enumerate(shown):
            for kind in stages:
                if not outcome[kind][position]:
                    continue
                if kind in config.target_types:
                    example = Example(np.asarray(history[0][-50:], dtype=np.int64),
                                      np.asarray(history[1][-50:], dtype=np.int64), int(item), EVENT_CODE[kind])
                    examples += 1
                    if examples % 10 == 0:
                        guard.add(example)
                    else:
                        batch.append(example)
                history[0].append(int(item))
                history[1].append(EVENT_CODE[kind])
        while len(batch) >= config.batch_size:
            trainer.step(batch[: config.batch_size])
            batch = batch[config.batch_size:]
        if (i + 1) % args.publish_every == 0:
            if batch:
                trainer.step(batch)
                batch = []
            if guard.check(trainer.model, serving).ok:
                serving = copy.deepcopy(trainer.model)
                guard.accepted(serving)
                published += 1
            else:
                refusals += 1
                trainer.reset(copy.deepcopy(serving))
        if (i + 1) % args.window == 0:
            ctr = {arm: round(float(np.mean(v)), 4) for arm, v in window.items()}
            windows.append({"requests": i + 1, "true_ctr": ctr, "uplift": round(ctr["learner"] - ctr["frozen"], 4)})
            window = {"learner": [], "frozen": []}
    last = windows[-len(windows) // 3 or 1:]
    result = {"versions_published": published, "guard_refusals": refusals,
              "examples": examples, "uplift_last_third": round(float(np.mean([w["uplift"] for w in last])), 4),
              "windows": windows}
    name = args.name or (f"{args.trainable}-lr{args.lr:g}-batch{args.batch_size}-warmup{args.warmup_steps}"
                         f"-labels_{args.labels.replace(',', '+')}-seed{args.seed}"
                         + ("-views_posted" if args.post_views else ""))
    from rerank.infra.results import write_results

    write_results(args.out, {name: {**result, "config": {**vars(args), "out": str(args.out)}}},
                  merge=True)  # each named run keeps its entry
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
