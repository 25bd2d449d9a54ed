"""Text <-> token ids for every player: chat-template rendering, stop ids, and a tiny tokenizer.

Owns two things:
- ``ChatTokenizer``: a thin wrapper over a Hugging Face tokenizer loaded offline from a local
  checkpoint directory (Llama-3, Qwen2, or the tiny one below). Game code renders user turns
  with it; samplers stop on its ``stop_token_ids``; training pads with its ``pad_id``.
- ``build_tiny_tokenizer``: trains a small deterministic byte-level BPE tokenizer on text the
  package ships (``data/assets/tiny_corpus.txt``), for the offline toy world and tests. The
  words the toy world keys on (``TOY_LEXICON``) are guaranteed to be single tokens.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Optional, Sequence

from advgame_jax.errors import UserError

PAD, BOS, USER, ASSISTANT, END = "<|pad|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"
TINY_SPECIAL_TOKENS = (PAD, BOS, USER, ASSISTANT, END)

# Words the offline toy world scores responses and attacks by. Each must encode to exactly one
# token both after a space (" sure") and at the start of a text or line ("sure").
TOY_LEXICON = (
    "sure",
    "here",
    "steps",
    "first",
    "then",
    "sorry",
    "cannot",
    "unable",
    "instead",
    "safely",
    "safety",
    "alternative",
    "please",
    "kindly",
    "think",
    "prompt",
)

# One user turn (plus optional assistant turns) and the generation prompt. Roles other than
# user/assistant have no special token in the tiny vocabulary, so they are rejected loudly.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' + message['content'] + '<|end|>' }}"
    "{% else %}{{ raise_exception('tiny chat template: role must be user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Copies of each lexicon word fed to the BPE trainer: far above any corpus word frequency, so
# the merges that build these words are learned before any other merge.
_LEXICON_WEIGHT = 4096


class TokenizerLoadError(UserError, ValueError):
    """A checkpoint directory does not hold a loadable tokenizer."""


class ChatTokenizer:
    """Chat-template rendering and token bookkeeping over a Hugging Face tokenizer.

    Build with ``ChatTokenizer.from_dir(path)``; the wrapped object is ``.hf``.
    """

    def __init__(
        self, hf_tokenizer, *, generation_eos_ids: Sequence[int] = (), source: str = "<memory>"
    ):
        self.hf = hf_tokenizer
        self.source = source
        if not getattr(hf_tokenizer, "chat_template", None):
            raise TokenizerLoadError(
                f"tokenizer at {source} has no chat template: expected `chat_template` in "
                "tokenizer_config.json or a chat_template.jinja file"
            )
        stop: list[int] = []
        for tid in list(_as_id_list(hf_tokenizer.eos_token_id)) + [
            int(t) for t in generation_eos_ids
        ]:
            if tid not in stop:
                stop.append(tid)
        if not stop:
            raise TokenizerLoadError(
                f"tokenizer at {source} defines no eos token: expected `eos_token` in "
                "tokenizer_config.json or `eos_token_id` in generation_config.json"
            )
        self._stop_token_ids = tuple(stop)
        pad = hf_tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else self._stop_token_ids[0]

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ChatTokenizer":
        """Load offline from a local directory (tokenizer.json/tokenizer_config.json[, generation_config.json])."""
        path = pathlib.Path(path)
        if not path.is_dir():
            raise TokenizerLoadError(
                f"tokenizer directory {path} does not exist: expected a local checkpoint "
                "directory holding tokenizer.json and tokenizer_config.json"
            )
        if (
            not (path / "tokenizer.json").is_file()
            and not (path / "tokenizer_config.json").is_file()
        ):
            raise TokenizerLoadError(
                f"tokenizer directory {path} has neither tokenizer.json nor tokenizer_config.json"
            )
        import transformers  # imported lazily: costs seconds, and only tokenizer users need it

        try:
            hf = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # transformers raises many types; report one clear error
            raise TokenizerLoadError(
                f"could not load a tokenizer from {path} (expected tokenizer.json + "
                f"tokenizer_config.json): {type(err).__name__}: {err}"
            ) from err
        return cls(hf, generation_eos_ids=_generation_eos_ids(path), source=str(path))

    # ---- rendering -------------------------------------------------------------------------
    def render_user_turn_text(self, text: str) -> str:
        """One user turn with the chat template and generation prompt, as text."""
        return self.hf.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )

    def render_user_turn(self, text: str) -> list[int]:
        """One user turn with the chat template and generation prompt, as token ids."""
        out = self.hf.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; 4.x returned a plain list.
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        out = list(out)
        if out and isinstance(out[0], (list, tuple)):
            out = list(out[0])
        return [int(t) for t in out]

    # ---- plain text ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(t) for t in self.hf.encode(text, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(
            [int(t) for t in ids],
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    # ---- bookkeeping -----------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokenizer eos id(s) then generation_config eos id(s), de-duplicated, in that order."""
        return self._stop_token_ids

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, added tokens included."""
        return len(self.hf)

    def save(self, path: str | os.PathLike) -> str:
        """Write the tokenizer (and the generation eos ids) so ``from_dir`` restores it."""
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(path))
        own_eos = set(_as_id_list(self.hf.eos_token_id))
        extra = [t for t in self._stop_token_ids if t not in own_eos]
        gen_path = path / "generation_config.json"
        if extra and not gen_path.exists():
            gen_path.write_text(
                json.dumps({"eos_token_id": list(self._stop_token_ids)}, indent=2) + "\n"
            )
        return str(path)

    def __repr__(self) -> str:
        return f"ChatTokenizer(source={self.source!r}, vocab_size={self.vocab_size}, stop={self._stop_token_ids})"


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _generation_eos_ids(path: pathlib.Path) -> list[int]:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return []
    try:
        cfg = json.loads(gen.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerLoadError(f"{gen}: expected a JSON object ({err})") from err
    if not isinstance(cfg, dict):
        raise TokenizerLoadError(f"{gen}: expected a JSON object")
    try:
        return _as_id_list(cfg.get("eos_token_id"))
    except (TypeError, ValueError) as err:
        raise TokenizerLoadError(f"{gen}: eos_token_id must be an int or a list of ints") from err


# ---- tiny tokenizer ----------------------------------------------------------------------------
def default_corpus_paths() -> list[str]:
    from advgame_jax.data.seeds import packaged_seed_path

    return [packaged_seed_path("tiny_corpus.txt")]


def _training_lines(corpus_paths: Sequence[str]) -> list[str]:
    lines: list[str] = []
    for p in corpus_paths:
        try:
            text = pathlib.Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TokenizerLoadError(
                f"corpus file {p}: expected a readable UTF-8 text file ({err})"
            ) from err
        lines.extend(line for line in text.splitlines() if line.strip())
    # Lexicon words at line start ("sure") and after a space (" sure") are distinct byte-level
    # pre-tokens; weight both so each becomes a whole token.
    for word in TOY_LEXICON:
        lines.append(" ".join([word] * _LEXICON_WEIGHT))
        lines.extend([word] * _LEXICON_WEIGHT)
    return lines


def build_tiny_tokenizer(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 512,
    corpus_paths: Optional[Sequence[str]] = None,
) -> str:
    """Train a byte-level BPE tokenizer and save it where AutoTokenizer and ChatTokenizer load it.

    Deterministic: the same corpus and ``vocab_size`` give the same tokenizer.json. Returns
    ``out_dir``. Raises ``ValueError`` if ``vocab_size`` is too small to hold every
    ``TOY_LEXICON`` word as a single token.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if corpus_paths is None:
        corpus_paths = default_corpus_paths()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_lines(corpus_paths), trainer=trainer)

    missing = [w for w in TOY_LEXICON for form in (w, " " + w) if len(tok.encode(form).ids) != 1]
    if missing:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: lexicon words {sorted(set(missing))} are not "
            "single tokens; expected a vocab_size of about 512"
        )

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    hf.chat_template = TINY_CHAT_TEMPLATE
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    # Keep the template and a class name every transformers version knows inside
    # tokenizer_config.json (one source of truth; older loaders ignore chat_template.jinja).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = TINY_CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    return str(out)
