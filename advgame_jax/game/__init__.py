"""The attacker–defender game (GAME_SPEC §2): templates, format parsing, the rollout tree
(B×A×D) and its errors, judges, reward patching, preference pairs and GRPO advantages,
metrics and the audit log. Game logic never imports training code.

The game loop calls, per seed split::

    players = TreePlayers(judge, defender, defender_tokenizer, attacker, attacker_tokenizer)
    scored = build_tree(seeds, game_config, players, sample_index=2 * step + split)
    pairs(scored, "attacker" | "defender")                   # DPO / IPO
    grpo_samples(scored, "attacker" | "defender", baseline)  # GRPO
    tree_metrics(scored); audit_log.write(scored, step=step, split=split)
"""

from advgame_jax.game.audit import (
    AuditLog,
    AuditLogError,
    read_audit_log,
    record_to_scored_tree,
    replay,
)
from advgame_jax.game.config import GameConfig, GameConfigError, game_config_from
from advgame_jax.game.endpoint import EndpointBackend, JudgeEndpointError
from advgame_jax.game.factory import make_judge
from advgame_jax.game.judge import (
    FaithRequest,
    Judge,
    LLMJudge,
    PairRequest,
    PointRequest,
    SamplerBackend,
    TextBackend,
)
from advgame_jax.game.metrics import tree_metrics
from advgame_jax.game.normalization import NORMALIZATIONS, pair_weight, sample_weight, with_weight
from advgame_jax.game.parsing import (
    faith_majority,
    parse_attack,
    parse_faith_verdict,
    parse_pair_scores,
    parse_score,
)
from advgame_jax.game.rewards import (
    PLAYERS,
    advantages,
    groups,
    grpo_advantages,
    grpo_samples,
    pair_indices,
    pairs,
    pairs_detailed,
    patch_reward,
    select_response,
)
from advgame_jax.game.rollout import TreePlayers, build_tree, sample_tree, score_tree
from advgame_jax.game.rule_judge import COMPLY_WORDS, DEFLECT_WORDS, REFUSE_WORDS, RuleJudge
from advgame_jax.game.templates import (
    TemplateError,
    TemplateSet,
    available_template_sets,
    get_template_set,
    register_template_set,
)
from advgame_jax.game.tree import (
    AttackSlot,
    JudgeStats,
    ResponseSlot,
    RolloutTree,
    ScoredTree,
    SeedSlot,
    XError,
    YError,
    concat_scored_trees,
)

__all__ = [
    "AttackSlot",
    "AuditLog",
    "AuditLogError",
    "COMPLY_WORDS",
    "DEFLECT_WORDS",
    "EndpointBackend",
    "FaithRequest",
    "GameConfig",
    "GameConfigError",
    "Judge",
    "JudgeEndpointError",
    "JudgeStats",
    "LLMJudge",
    "PLAYERS",
    "PairRequest",
    "PointRequest",
    "REFUSE_WORDS",
    "ResponseSlot",
    "RolloutTree",
    "RuleJudge",
    "SamplerBackend",
    "ScoredTree",
    "SeedSlot",
    "TemplateError",
    "TemplateSet",
    "TextBackend",
    "TreePlayers",
    "XError",
    "YError",
    "advantages",
    "available_template_sets",
    "build_tree",
    "faith_majority",
    "game_config_from",
    "get_template_set",
    "grpo_advantages",
    "grpo_samples",
    "groups",
    "make_judge",
    "pair_indices",
    "pairs",
    "pairs_detailed",
    "parse_attack",
    "parse_faith_verdict",
    "parse_pair_scores",
    "parse_score",
    "patch_reward",
    "read_audit_log",
    "record_to_scored_tree",
    "register_template_set",
    "replay",
    "sample_tree",
    "score_tree",
    "select_response",
    "tree_metrics",
    "concat_scored_trees",
    "NORMALIZATIONS",
    "pair_weight",
    "sample_weight",
    "with_weight",
]
