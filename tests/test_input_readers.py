"""Hostile and careless input files: every reader (seed JSONL, the JSONL/CSV/TSV prompt sets,
jailbreak templates, game template files, classifier templates, safetensors) reports
``file:line`` and the expected form as one ``UserError``, never a raw exception; an unclosed
CSV quote is named on the line where the quoted field started instead of merging rows; a
UTF-8 byte-order mark before a CSV header is ignored; ``{{prompt}}`` in a template is the
literal ``{prompt}``."""

import csv
import json

import pytest

from advgame_jax.data import SeedFileError, read_seeds_jsonl
from advgame_jax.data import wildjailbreak as wjb
from advgame_jax.data.readers import ReaderError, table_rows
from advgame_jax.errors import UserError
from advgame_jax.evaluation.prompt_sets import PromptSetError, load_prompt_set
from advgame_jax.game import templates as tpl

DEEP = "[" * 100_000 + "]" * 100_000  # beyond any recursion limit of the JSON decoder
GOOD_SEED = '{"prompt": "open the vault", "category": "harmful"}'


def _one_line_user_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, UserError) and "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


# ---- item 14: deeply nested JSON ------------------------------------------------------------
def test_deeply_nested_seed_line_is_a_user_error_not_recursion(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text(f'{GOOD_SEED}\n{{"prompt": {DEEP}, "category": "benign"}}\n')
    with pytest.raises(SeedFileError) as err:
        read_seeds_jsonl(path)
    _one_line_user_error(err, f"{path}:2:", "nested too deeply", '"category": "harmful" | "benign"')


@pytest.mark.parametrize(
    "kind,line",
    [
        ("seeds", '{"prompt": %s, "category": "benign"}'),
        ("wildguardtest", '{"prompt": %s, "prompt_harm_label": "harmful"}'),
    ],
)
def test_deeply_nested_prompt_set_line(tmp_path, kind, line):
    path = tmp_path / "set.jsonl"
    first = line % '"fine"'
    path.write_text(first + "\n\n" + line % DEEP + "\n")
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"{kind}:{path}")
    _one_line_user_error(err, f"{path}:3:", "nested too deeply")


def test_moderately_nested_field_is_refused_as_not_a_string(tmp_path):
    # Decodable nesting: the field must still be a string (str() of it would recurse).
    path = tmp_path / "wgt.jsonl"
    path.write_text(
        json.dumps(
            {
                "prompt": "p",
                "prompt_harm_label": "harmful",
                "subcategory": json.loads("[" * 500 + "]" * 500),
            }
        )
        + "\n"
    )
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"wildguardtest:{path}")
    _one_line_user_error(err, f"{path}:1:", "'subcategory' is a JSON list")
    path.write_text('{"prompt": ["p"], "prompt_harm_label": "harmful"}\n')
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"wildguardtest:{path}")
    _one_line_user_error(err, f"{path}:1:", "'prompt' is a JSON list", "expected a string")


def test_deeply_nested_dan_templates_jsonl(tmp_path):
    t = tmp_path / "t.jsonl"
    t.write_text('{"template": "x"}\n{"template": %s}\n' % DEEP)
    seeds = tmp_path / "b.jsonl"
    seeds.write_text(GOOD_SEED + "\n")
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"dan:{t},{seeds}")
    _one_line_user_error(err, f"{t}:2:", "nested too deeply", '{"template": <string>}')


# ---- item 5: unclosed CSV quotes --------------------------------------------------------------
def _write(path, text):
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    "kind,header",
    [
        ("harmbench", "Behavior,SemanticCategory,BehaviorID"),
        ("xstest", "prompt,type,label,id"),
        ("orbench", "prompt,category,x"),
    ],
)
def test_unclosed_quote_names_its_line_instead_of_merging_rows(tmp_path, kind, header):
    def row(i, first):
        return {
            "harmbench": f"{first},cat,id{i}",
            "xstest": f"{first},t,safe,{i}",
            "orbench": f"{first},c,{i}",
        }[kind]

    good = [row(i, f"prompt {i}") for i in range(1, 6)]
    # Line 4 opens a quote it never closes; the csv module would swallow lines 4-6 into one
    # prompt (closing it at the next quoted field) and go on without a word.
    rows = good[:2] + [row(3, '"unclosed prompt')] + good[2:4] + [row(6, '"quoted"')] + good[4:]
    path = _write(tmp_path / "f.csv", "\n".join([header] + rows) + "\n")
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"{kind}:{path}")
    msg = _one_line_user_error(err, f"{path}:4:", "quoted field that starts on this line")
    assert "line 7" in msg and '""' in msg
    # At the end of the file: the quote is named, the reader does not return a merged row.
    path = _write(
        tmp_path / "g.csv",
        "\n".join([header] + good[:2] + [row(3, '"never closed')] + good[2:]) + "\n",
    )
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"{kind}:{path}")
    _one_line_user_error(err, f"{path}:4:", "before the end of the file")


def test_quote_opening_after_a_legit_multiline_field_is_located(tmp_path):
    text = (
        'Behavior,SemanticCategory\n"two\nline behaviour",a\nok,b\nbad "x",c\n'
        'next,"d\nrow,e\nlast,"f",g\n'
    )
    # line 5 holds an unquoted field with a quote inside (allowed: the csv module keeps it);
    # line 6 opens a quoted field that closes on line 8 before more text.
    path = _write(tmp_path / "hb.csv", text)
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"harmbench:{path}")
    _one_line_user_error(err, f"{path}:6:")


def test_well_formed_multiline_and_escaped_quotes_still_read(tmp_path):
    path = tmp_path / "hb.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Behavior", "SemanticCategory", "ContextString", "BehaviorID"])
        w.writerow(['say "hi"', "a", "line one\nline two", "b1"])
        w.writerow(["plain", "b", "", "b2"])
    ex = load_prompt_set(f"harmbench:{path}").examples
    assert [(e.uid, e.prompt) for e in ex] == [
        ("b1", 'line one\nline two\n\nsay "hi"'),
        ("b2", "plain"),
    ]


def test_wildjailbreak_tsv_unclosed_quote(tmp_path):
    head = "vanilla\tadversarial\tcompletion\tdata_type\n"
    rows = [f"v{i}\t\tc\tvanilla_harmful\n" for i in range(4)]
    rows[1] = '"v1 unclosed\t\tc\tvanilla_harmful\n'
    rows[3] = '"v3"x\t\tc\tvanilla_harmful\n'
    path = _write(tmp_path / "train.tsv", head + "".join(rows))
    with pytest.raises(wjb.WildJailbreakFormatError) as err:
        wjb.read_wildjailbreak_tsv(path)
    _one_line_user_error(err, f"{path}:3:", "not closed")


# ---- item 15 (readers): non-UTF-8 with file:line ----------------------------------------------
@pytest.mark.parametrize(
    "kind,name,text",
    [
        ("harmbench", "f.csv", b"Behavior,SemanticCategory\nok,a\nbad \xe9 byte,b\n"),
        ("xstest", "f.csv", b"id,prompt,type,label\n1,ok,t,safe\n2,bad \xff,t,safe\n"),
        ("wildjailbreak", "f.tsv", b"adversarial\tdata_type\nok\tadversarial_harmful\n\xc3(\tx\n"),
        ("orbench", "f.csv", b"prompt,category\nok,c\n\x80,c\n"),
        (
            "wildguardtest",
            "f.jsonl",
            b'{"prompt": "p", "prompt_harm_label": "harmful"}\n\n{"prompt": "\xfe"}\n',
        ),
    ],
)
def test_non_utf8_prompt_set_names_file_and_line(tmp_path, kind, name, text):
    path = tmp_path / name
    path.write_bytes(text)
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"{kind}:{path}")
    _one_line_user_error(err, f"{path}:3:", "is not UTF-8")


def test_non_utf8_and_malformed_template_files_name_the_line(tmp_path):
    good = tpl.template_set_to_text(tpl.get_template_set("toy_v1"), header="my set")
    lines = good.splitlines(keepends=True)
    bad = tmp_path / "mine.txt"
    bad.write_bytes("".join(lines[:6]).encode() + b"caf\xe9\n" + "".join(lines[6:]).encode())
    with pytest.raises(tpl.TemplateError) as err:
        tpl.load_template_file(str(bad))
    _one_line_user_error(err, f"{bad}:7:", "byte 0xe9 at column 4 is not UTF-8")
    # A section that lost its placeholder is named on its header line.
    n = next(i for i, line in enumerate(lines, 1) if line.startswith("=== defender ==="))
    broken = good.replace("{prompt}", "prompt", 1)
    assert broken != good
    bad.write_text(broken, encoding="utf-8")
    with pytest.raises(tpl.TemplateError) as err:
        tpl.load_template_file(str(bad))
    _one_line_user_error(err, f"{bad}:{n}:", "'defender'", "placeholders")
    bad.write_text(good + "\n=== defender ===\n{prompt}\n", encoding="utf-8")
    with pytest.raises(tpl.TemplateError) as err:
        tpl.load_template_file(str(bad))
    _one_line_user_error(err, "appears twice", f"(first on line {n})")


def test_non_utf8_classifier_template(tmp_path):
    from advgame_jax.evaluation.classifiers import TemplateClassifier

    path = tmp_path / "clf.txt"
    path.write_bytes(b"Judge {prompt}\nand\n{response} \xff\n")
    with pytest.raises(ReaderError) as err:
        TemplateClassifier(None, str(path))
    _one_line_user_error(err, f"{path}:3:", "not UTF-8")
    with pytest.raises(ReaderError) as err:
        TemplateClassifier(None, str(tmp_path / "missing.txt"))
    _one_line_user_error(err, "file not found")


# ---- item 22: UTF-8 BOM before a CSV header ----------------------------------------------------
def test_utf8_bom_header_is_not_a_missing_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes("\ufeffid,prompt,type,label\n1,hello there,t,safe\n".encode("utf-8"))
    (e,) = load_prompt_set(f"xstest:{path}").examples
    assert (e.uid, e.prompt, e.category) == ("xs-1", "hello there", "benign")
    path.write_bytes("\ufeffprompt,category\nhi,c\n".encode("utf-8"))
    assert [r for _, r in table_rows(path, ("prompt",))] == [{"prompt": "hi", "category": "c"}]
    seeds = tmp_path / "s.jsonl"
    seeds.write_bytes(("\ufeff" + GOOD_SEED + "\n").encode("utf-8"))
    assert read_seeds_jsonl(seeds)[0].prompt == "open the vault"


# ---- item 22: {{prompt}} in a template -------------------------------------------------------
def test_escaped_placeholder_is_literal_text():
    # Before: fill() replaced the inner {prompt} and left the braces: "{<attack>}".
    assert tpl.fill("show {{prompt}} then {prompt}", prompt="X") == "show {prompt} then X"
    assert tpl.placeholders("a {{seed}} b {prompt}") == {"prompt"}
    base = dict(tpl.get_template_set("toy_v1").sections)
    base["defender"] = "Literal {{prompt}} marker, then the attack:\n{prompt}"
    ts = tpl.TemplateSet("escaped", base)
    assert ts.defender_prompt("ATTACK") == "Literal {prompt} marker, then the attack:\nATTACK"
    # An escaped placeholder does not count as a use: a section with only {{prompt}} lacks it.
    base["defender"] = "only {{prompt}}"
    with pytest.raises(tpl.TemplateError, match="placeholders"):
        tpl.TemplateSet("escaped2", base)


def test_readers_never_echo_file_contents(tmp_path):
    secret = "SECRET-PROMPT-TEXT"
    path = _write(tmp_path / "f.csv", f'Behavior,SemanticCategory\n"{secret},a\nz,"b"c\n')
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(f"harmbench:{path}")
    assert secret not in str(err.value)


# ---- item 18: a templated prompt over the attacker's budget warns at load ----------------------
def test_template_over_the_attacker_budget_is_reported_naming_the_field():
    base = dict(tpl.get_template_set("toy_v1").sections)
    base["attacker_task_benign"] = "pad " * 3000 + "{seed}"  # 12 kB before any seed
    ts = tpl.TemplateSet("huge_benign", base)
    tpl.register_template_set(ts, overwrite=True)

    def count(text):  # one token per byte, plus a two-token chat wrapper
        return len(text.encode("utf-8")) + 2

    assert tpl.attacker_prompts_over_budget(ts, "any", count, 2048) == [
        ("benign", count(ts.attacker_prompt("", "benign", "any")))
    ]
    assert tpl.attacker_prompts_over_budget(ts, "any", count, 10**6) == []
    assert (
        tpl.attacker_prompts_over_budget(tpl.get_template_set("toy_v1"), "any", count, 2048) == []
    )

    (msg,) = tpl.template_budget_warnings("huge_benign", "any", count, 2048)
    assert "config.game.templates='huge_benign'" in msg and "attacker_task_benign" in msg
    assert "prompt budget of 2048 tokens" in msg and "MAX_LENGTH" in msg
    assert tpl.template_budget_warnings("toy_v1", "any", count, 2048) == []
    # The loop reports these at load, next to the over-long seeds.
    import inspect

    from advgame_jax.experiment.assembly import report_unfit_seeds

    assert "template_budget_warnings" in inspect.getsource(report_unfit_seeds)
