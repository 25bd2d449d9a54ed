"""Host cost of one scored rollout tree, B=512 (the shared WildJailbreak seeds), A=2, D=3:
pairs of both players, ``tree_metrics`` and the audit-log dict (``codec.to_plain``) and its
JSON text. Stub samplers and the rule judge, so only the tree code is timed. Median of 5.

    python benchmarks/tree_host.py
"""

import glob
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from advgame_jax import game  # noqa: E402
from advgame_jax.codec import to_plain  # noqa: E402
from advgame_jax.data import read_seeds_jsonl  # noqa: E402
from tests.game_stubs import ByteTokenizer, PseudoRandomAttacker, PseudoRandomDefender  # noqa: E402


def median_ms(fn, reps=5):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 1)


def main():
    seeds = []
    for path in sorted(
        glob.glob(os.path.join(ROOT, "..", "shared", "data", "wildjailbreak_vanilla", "*.jsonl"))
    ):
        seeds += read_seeds_jsonl(path)
    tok = ByteTokenizer()
    cfg = game.GameConfig(num_attacks=2, num_responses=3)

    def build():
        return game.build_tree(
            seeds,
            cfg,
            judge=game.RuleJudge(),
            attacker=PseudoRandomAttacker(seed=1),
            attacker_tokenizer=tok,
            defender=PseudoRandomDefender(seed=2),
            defender_tokenizer=tok,
        )

    scored = build()
    print(
        json.dumps(
            {
                "seeds": len(seeds),
                "build_tree_ms": median_ms(build, 3),
                "pairs_ms": median_ms(lambda: [game.pairs(scored, p) for p in game.PLAYERS]),
                "metrics_ms": median_ms(lambda: game.tree_metrics(scored)),
                "to_plain_ms": median_ms(lambda: to_plain(scored)),
                "to_plain_json_ms": median_ms(lambda: json.dumps(to_plain(scored))),
            }
        )
    )


if __name__ == "__main__":
    main()
