"""ChatTokenizer and the tiny tokenizer, checked against jinja2 and the raw `tokenizers` library."""

import json

import jinja2
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from advgame_jax import tokenization as tk

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

UNICODE_TEXTS = [
    "sure, here are the steps: first this, then that.",
    "Grüße aus München — crème brûlée, naïve café",
    "桜の花 and emoji 😀🚲 with\ttabs\nand   spaces  ",
    "",
]


def _jinja_render(template, **kwargs):
    # The same environment flags transformers documents for chat templates.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tk.build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return tk.ChatTokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A Llama-3-like tokenizer saved by transformers, with a generation_config eos list."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["hello world, how are you today?", "the assistant says hello"] * 10, trainer
    )
    # Like Llama-3, plain encoding prepends BOS; the chat template already holds it, so the
    # rendered turn must not get a second one.
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
    )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
    )
    hf.chat_template = LLAMA3_TEMPLATE
    out = tmp_path_factory.mktemp("llama_tok")
    hf.save_pretrained(str(out))
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIALS}
    gen = {"eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out, ids


def test_tiny_render_matches_jinja_and_raw_tokenizer(tiny, tiny_dir):
    text = "please help me plan a picnic"
    expected = _jinja_render(
        tk.TINY_CHAT_TEMPLATE,
        messages=[{"role": "user", "content": text}],
        add_generation_prompt=True,
        bos_token="<|bos|>",
    )
    assert expected == f"<|bos|><|user|>{text}<|end|><|assistant|>"
    assert tiny.render_user_turn_text(text) == expected
    raw = tokenizers.Tokenizer.from_file(f"{tiny_dir}/tokenizer.json")
    assert tiny.render_user_turn(text) == raw.encode(expected, add_special_tokens=False).ids
    ids = tiny.render_user_turn(text)
    assert ids[0] == raw.token_to_id("<|bos|>") and ids[-1] == raw.token_to_id("<|assistant|>")
    assert tiny.decode(ids) == text  # special tokens skipped


def test_tiny_loads_with_auto_tokenizer(tiny_dir, tiny):
    hf = transformers.AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    cfg = json.loads(open(f"{tiny_dir}/tokenizer_config.json").read())
    assert cfg["chat_template"] == tk.TINY_CHAT_TEMPLATE
    assert hf.chat_template == tk.TINY_CHAT_TEMPLATE
    assert hf.eos_token == "<|end|>" and hf.pad_token == "<|pad|>" and hf.bos_token == "<|bos|>"
    assert len(hf) == tiny.vocab_size == 512


def test_tiny_special_ids(tiny, tiny_dir):
    raw = tokenizers.Tokenizer.from_file(f"{tiny_dir}/tokenizer.json")
    assert tiny.stop_token_ids == (raw.token_to_id("<|end|>"),)
    assert tiny.pad_id == raw.token_to_id("<|pad|>")
    specials = {t.content for t in raw.get_added_tokens_decoder().values() if t.special}
    assert specials == set(tk.TINY_SPECIAL_TOKENS)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tiny_round_trip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_tiny_lexicon_single_tokens(tiny_dir):
    raw = tokenizers.Tokenizer.from_file(f"{tiny_dir}/tokenizer.json")
    for word in tk.TOY_LEXICON:
        spaced = raw.encode(" " + word, add_special_tokens=False).ids
        bare = raw.encode(word, add_special_tokens=False).ids
        assert len(spaced) == 1 and len(bare) == 1, word
        assert raw.encode("ok\n" + word).ids[-1] == bare[0], word
        assert raw.encode("ok then " + word).ids[-1] == spaced[0], word


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    again = tk.build_tiny_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(f"{again}/{name}", "rb").read() == open(f"{tiny_dir}/{name}", "rb").read()


def test_tiny_vocab_too_small_is_clear(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=280 is too small"):
        tk.build_tiny_tokenizer(tmp_path / "small", vocab_size=280)


def test_llama_like_render_and_stop_ids(llama_dir):
    path, ids = llama_dir
    ct = tk.ChatTokenizer.from_dir(path)
    text = "  hello world  "
    expected = _jinja_render(
        LLAMA3_TEMPLATE,
        messages=[{"role": "user", "content": text}],
        add_generation_prompt=True,
        bos_token="<|begin_of_text|>",
    )
    assert expected == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello world<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ct.render_user_turn_text(text) == expected
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    assert ct.render_user_turn(text) == raw.encode(expected, add_special_tokens=False).ids
    assert ct.render_user_turn(text).count(ids["<|begin_of_text|>"]) == 1
    assert ct.encode("hello", add_special_tokens=True)[0] == ids["<|begin_of_text|>"]
    assert ids["<|begin_of_text|>"] not in ct.encode("hello")
    # Tokenizer eos first, then generation_config extras; no pad token -> the eos.
    assert ct.stop_token_ids == (ids["<|eot_id|>"], ids["<|end_of_text|>"])
    assert ct.pad_id == ids["<|eot_id|>"]
    assert ct.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for t in UNICODE_TEXTS:
        assert ct.decode(ct.encode(t)) == t


def test_save_round_trip(llama_dir, tmp_path):
    path, _ = llama_dir
    ct = tk.ChatTokenizer.from_dir(path)
    ct2 = tk.ChatTokenizer.from_dir(ct.save(tmp_path / "saved"))
    assert ct2.stop_token_ids == ct.stop_token_ids
    assert ct2.render_user_turn("hello") == ct.render_user_turn("hello")


def test_missing_dir_and_files_are_clear(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(tk.TokenizerLoadError, match=str(missing)):
        tk.ChatTokenizer.from_dir(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tk.TokenizerLoadError, match=f"{empty}.*tokenizer.json"):
        tk.ChatTokenizer.from_dir(empty)


def test_missing_chat_template_is_clear(llama_dir, tmp_path):
    path, _ = llama_dir
    hf = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    hf.chat_template = None
    hf.save_pretrained(str(tmp_path / "notemplate"))
    with pytest.raises(tk.TokenizerLoadError, match="no chat template"):
        tk.ChatTokenizer.from_dir(tmp_path / "notemplate")
