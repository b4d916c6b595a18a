"""Chat templates (llm.data.chat): Jinja templates render as transformers' apply_chat_template,
chat_turn's Jinja translation renders as the format string, assistant-only loss masks, the
template a run writes, reading templates from tokenizer folders, and every refusal by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llm.config import ConfigError
from llm.data.chat import (
    DEFAULT_TURN,
    ChatTemplate,
    JinjaChatTemplate,
    Message,
    build_chat_template,
    jinja_source,
    read_chat_template,
)
from llm.data.formats import DatasetError, load_rows, parse_rows
from llm.data.posttrain import IGNORE_INDEX, collate_sft, tokenize_sft
from llm.files import InputError
from llm.tokenizer import build_tokenizer
from llm.tokenizer.tokenizer import BOS, EOS, PAD

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 3's shape: bos_token, a filter, whitespace control.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Zephyr's shape: block tags on their own lines (trim_blocks/lstrip_blocks matter), eos_token.
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# TRL's training templates mark the assistant's tokens with {% generation %} (return_assistant_tokens_mask).
GENERATION = ("{% for message in messages %}{% if message.role == 'assistant' %}<|im_start|>assistant\n"
              "{% generation %}{{ message.content + '<|im_end|>\n' }}{% endgeneration %}{% else %}<|im_start|>"
              "{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR, "generation": GENERATION}

# Content that a format string or a template could mistake for its own syntax.
CONVERSATIONS = [
    [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "be {brief} {{x}} {%y%} {#z#}"}, {"role": "user", "content": "{role}: {content}"},
     {"role": "assistant", "content": " 4 \n"}, {"role": "user", "content": 'é\u2028😀"\\\t\r\n'},
     {"role": "assistant", "content": "}{"}],
]
# Format strings with braces, tabs, quotes, backslashes and non-ASCII in them.
TURNS = [(DEFAULT_TURN, None), ("<{role}>{{{content}}}</{role}>\t\n", "<bot>é"),
         ("### {role}\n{content}\n", "### R\n"),
         ('{role} said "{content}"\\\r\n', None), ("{content}\n\n", "")]


def messages(conversation: list[dict]) -> list[Message]:
    return [Message(**m) for m in conversation]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(None, tmp_path_factory.mktemp("cache"), kind="byte")


def test_jinja_templates_render_as_transformers_apply_chat_template(tok):
    transformers = pytest.importorskip("transformers")
    for name, source in TEMPLATES.items():
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=source, bos_token=BOS,
                                                  eos_token=EOS, pad_token=PAD)
        ours = JinjaChatTemplate(source)
        for conversation in CONVERSATIONS:
            for generation in (False, True):
                expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
                got = ours.prompt(messages(conversation)) if generation else ours.render(messages(conversation))
                assert got == expected, (name, conversation, generation)
    # chat_turn's translation is what the HF export ships: transformers renders it as the run did.
    for turn, generation_prompt in TURNS:
        template = ChatTemplate(turn, generation_prompt)
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=jinja_source(template))
        for conversation in CONVERSATIONS:
            assert hf.apply_chat_template(conversation, tokenize=False) == template.render(messages(conversation))
            assert (hf.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
                    == template.prompt(messages(conversation[:-1])))


def test_assistant_masks_equal_transformers_generation_masks(tok):
    """Where a template marks the assistant's text with {% generation %}, transformers' assistant
    mask (what TRL's assistant_only_loss trains) equals ours, found by rendering prefixes."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=GENERATION, bos_token=BOS,
                                              eos_token=EOS, pad_token=PAD)
    for conversation in CONVERSATIONS:
        out = hf.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        segments = JinjaChatTemplate(GENERATION).segments(messages(conversation))
        trained = [s.trained for s in segments for _ in tok.encode(s.text)]
        assert [bool(m) for m in out["assistant_masks"]] == trained
        assert sum(trained) > 0


def test_chat_turn_translation_renders_as_the_format_string():
    for turn, generation_prompt in TURNS:
        template = ChatTemplate(turn, generation_prompt)
        translated = JinjaChatTemplate(jinja_source(template))
        for conversation in CONVERSATIONS:
            m = messages(conversation)
            assert translated.render(m) == template.render(m), (turn, conversation)
            assert translated.prompt(m[:-1]) == template.prompt(m[:-1])
            assert translated.segments(m) == template.segments(m)  # the same trained text too
            assert translated.segments(m, trained_from=3) == template.segments(m, trained_from=3)


def test_assistant_only_masks_of_a_two_turn_chat_by_hand(tok):
    chat = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3="}, {"role": "assistant", "content": "6"}]
    masked = ["<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n",
              "<|im_start|>user\n3+3=<|im_end|>\n<|im_start|>assistant\n"]
    trained = ["4<|im_end|>\n", "6<|im_end|>\n"]
    expected: list[int] = []
    for m, t in zip(masked, trained):  # byte tokenizer: a token per byte
        expected += [IGNORE_INDEX] * len(m.encode()) + list(t.encode())
    expected += [tok.eos_id]  # EOS ends the document, trained with the last assistant turn
    expected[0] = IGNORE_INDEX  # nothing in the document predicts its first token
    [example] = parse_rows(load_rows([{"messages": chat}]), "sft", template=JinjaChatTemplate(CHATML))
    labels = collate_sft(tokenize_sft([example], tok, 256).examples, tok.pad_id)["labels"][0].tolist()
    assert labels == expected
    # Conversational prompt/completion: only the completion's assistant turn is trained.
    [pc] = parse_rows(load_rows([{"prompt": chat[:3], "completion": chat[3:]}]), "sft",
                      template=JinjaChatTemplate(CHATML))
    labels = collate_sft(tokenize_sft([pc], tok, 256).examples, tok.pad_id)["labels"][0].tolist()
    first_turn = len((masked[0] + trained[0]).encode())
    assert labels == [IGNORE_INDEX] * first_turn + expected[first_turn:]
    # Preference pairs and prompts cut where the generation prompt ends.
    [pair] = parse_rows(load_rows([{"prompt": chat[:1], "chosen": chat[1:2], "rejected": [
        {"role": "assistant", "content": "5"}]}]), "preference", template=JinjaChatTemplate(CHATML))
    assert (pair.prompt, pair.chosen, pair.rejected) == (masked[0], trained[0], "5<|im_end|>\n")


def test_a_template_that_is_not_prefix_stable_is_refused_naming_the_row():
    # The last message alone gets a marker: rendering more messages rewrites an earlier turn.
    last = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} (last){% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigError, match="posttrain.data.chat_template: the template is not prefix-stable"):
        JinjaChatTemplate(last)
    # Prefix-stable on the trial exchange, not on a longer conversation: that row is named.
    # A last assistant message is marked: each turn extends the one before, but the whole
    # conversation does not extend messages[:3].
    later = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last and loop.index > 2 and "
             "m.role == 'assistant' %} (last){% endif %}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    template = JinjaChatTemplate(later)
    with pytest.raises(DatasetError) as error:
        parse_rows(load_rows([{"messages": CONVERSATIONS[1]}]), "sft", template=template)
    assert error.value.problems[0].startswith(
        "list[0]: posttrain.data.chat_template: the template is not prefix-stable")
    assert "rendering of all 5 messages does not start with its rendering of messages[:3]" in error.value.problems[0]


def _data(**values) -> SimpleNamespace:
    return SimpleNamespace(**{"chat_turn": DEFAULT_TURN, "generation_prompt": None, "chat_template": None, **values})


def test_build_chat_template_from_each_kind_of_value(tmp_path):
    assert isinstance(build_chat_template(_data()), ChatTemplate)
    assert build_chat_template(_data(chat_template=CHATML)).source == CHATML
    (tmp_path / "chatml.jinja").write_text(CHATML)
    assert build_chat_template(_data(chat_template=str(tmp_path / "chatml.jinja"))).source == CHATML
    folder = tmp_path / "parent"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3}))
    assert build_chat_template(_data(chat_template="tokenizer"), folder).source == LLAMA3
    assert build_chat_template(_data(chat_template=str(folder))).source == LLAMA3  # a tokenizer folder


def test_read_chat_template_from_a_tokenizer_folder(tmp_path):
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": ZEPHYR}, {"name": "default", "template": LLAMA3}]}))
    assert read_chat_template(tmp_path) == LLAMA3  # transformers' named templates: the default one
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert read_chat_template(tmp_path) == CHATML  # the file wins, as in transformers
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(InputError, match="chat_template: .*tokenizer_config.json is not JSON"):
        read_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 7}))
    with pytest.raises(InputError, match="chat_template is 7, not a Jinja template"):
        read_chat_template(tmp_path)


CRAFTED = ["{{ ''.__class__.__mro__ }}", "{{ ''.__class__ }}", "{% for m in messages %}{{ m.__class__ }}{% endfor %}",
           "{{ cycler.__init__.__globals__.os.popen('id').read() }}", "{{ messages.append(1) }}"]


@pytest.mark.parametrize("source", CRAFTED)
def test_a_crafted_template_read_from_disk_runs_no_code(tmp_path, source):
    (tmp_path / "chat_template.jinja").write_text(source + "{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ConfigError, match=r"posttrain.data.chat_template: .*SecurityError: access to attribute"):
        build_chat_template(_data(chat_template="tokenizer"), tmp_path)


@pytest.mark.parametrize("values,folder,phrases", [
    (dict(chat_template="tokenizer"), "empty", ["chat_template=tokenizer: the parent's tokenizer folder",
                                                "has no chat template", "chat_template=null to use chat_turn"]),
    (dict(chat_template="tokenizer"), None, ["chat_template=tokenizer: there is no parent tokenizer"]),
    (dict(chat_template=CHATML, chat_turn="<{role}>{content}\n"),
     None, ["posttrain.data.chat_turn='<{role}>{content}\\n' and posttrain.data.chat_template are both given"]),
    (dict(chat_template=CHATML, generation_prompt="A: "), None, ["posttrain.data.generation_prompt='A: ' is for "
                                                                 "chat_turn"]),
    (dict(chat_template=" "), None, ["posttrain.data.chat_template=' ': empty"]),
    (dict(chat_template="{% if %}"), None, ["posttrain.data.chat_template: not a valid Jinja template"]),
    (dict(chat_template="{{ raise_exception('roles must alternate') }}"), None,
     ["posttrain.data.chat_template: the template failed", "TemplateError: roles must alternate"]),
    (dict(chat_template="no/such/template.jinja"), None, ["posttrain.data.chat_template: no/such/template.jinja "
                                                          "does not exist", "give a Jinja template"]),
    (dict(chat_turn="{role}: {content"), None, ["posttrain.data.chat_turn='{role}: {content': needs exactly one"]),
    (dict(chat_turn="{role!r}: {content}"), None, ["take no format spec or conversion"]),
])
def test_chat_template_refusals_name_the_key(tmp_path, values, folder, phrases):
    if folder:
        (tmp_path / folder).mkdir()
    with pytest.raises((ConfigError, InputError)) as error:
        build_chat_template(_data(**values), tmp_path / folder if folder else None)
    for phrase in phrases:
        assert phrase in str(error.value), (phrase, str(error.value))


# ---------------------------------------------------------------- a post-training run


def test_a_run_that_reads_conversations_writes_its_template(tmp_path, tok, single_thread):
    """The recipe renders with the configured template (here the parent tokenizer's) and writes
    what it rendered with to <run>/chat_template.jinja; a run on plain strings writes none."""
    from omegaconf import OmegaConf

    from llm.model import ModelConfig, Transformer
    from llm.recipes import recipe_for
    from llm.run import RunDir
    from llm.run.plan import Settings
    from tests.conftest import compose_train
    from tests.test_posttrain import PARENT_SHAPE, TINY, save_run

    model_config = ModelConfig(**PARENT_SHAPE, vocab_size=tok.vocab_size)
    parent = save_run(tmp_path / "parent", Transformer(model_config), model_config, tok, "pretrain")
    short = ("{% for m in messages %}<{{ m.role[0] }}>{{ m.content }}\n{% endfor %}"  # rows fit data.seq_len=48
             "{% if add_generation_prompt %}<a>{% endif %}")
    (parent / "chat_template.jinja").write_text(short)
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1="},
                                                    {"role": "assistant", "content": f"{i + 1}"}]}) + "\n"
                            for i in range(8)))
    overrides = ["posttrain=sft", f"init_from={parent}", *TINY]
    composed = compose_train(overrides, tmp_path)  # once: the cases differ in posttrain.data only
    source = {"source": str(rows), "val_source": str(rows)}
    for name, data_keys, written in (("jinja", {**source, "chat_template": "tokenizer"}, short),
                                     ("chat_turn", source, jinja_source(ChatTemplate())), ("tasks", {}, None)):
        cfg, run_dir = composed.copy(), tmp_path / name
        for key, value in data_keys.items():
            OmegaConf.update(cfg, f"posttrain.data.{key}", value)
        recipe = recipe_for(cfg)
        cfg = recipe.prepare(cfg, overrides)
        data = recipe.data(cfg, Settings.of(cfg), RunDir(run_dir))
        path = run_dir / "chat_template.jinja"
        assert (path.read_text() if path.exists() else None) == written, name
        if written == short:  # the rows were rendered with it, the answers trained
            batch = next(iter(data.datamodule.val_dataloader()))
            labels = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
            assert tok.decode(batch["tokens"][0].tolist()).startswith("<u>")
            assert tok.decode(labels[:-1]).endswith("\n") and labels[-1] == tok.eos_id


def test_llm_train_refuses_a_crafted_or_missing_template_with_exit_2(tmp_path, tok, monkeypatch, capsys):
    from llm.model import ModelConfig, Transformer
    from tests.test_bad_inputs import llm_cli  # the real llm-train main, in this process
    from tests.test_posttrain import CLI_TINY, PARENT_SHAPE, save_run

    model_config = ModelConfig(**PARENT_SHAPE, vocab_size=tok.vocab_size)
    parent = save_run(tmp_path / "parent", Transformer(model_config), model_config, tok, "pretrain")
    crafted = tmp_path / "crafted.jinja"
    crafted.write_text("{{ cycler.__init__.__globals__.os.system('touch pwned') }}{{ messages[0].content }}")
    for value, phrase in ((crafted, "posttrain.data.chat_template: the template failed on a conversation of 2 "
                                    "message(s) (SecurityError: access to attribute '__init__'"),
                          ("tokenizer", "posttrain.data.chat_template=tokenizer: the parent's tokenizer folder")):
        args = ["posttrain=sft", f"init_from={parent}", f"posttrain.data.chat_template={value}", *CLI_TINY]
        code, stderr = llm_cli("train", args, tmp_path, monkeypatch, capsys)
        assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert phrase in stderr, stderr[-3000:]
    assert not (tmp_path / "pwned").exists()
