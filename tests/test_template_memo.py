"""A restart reads its start-up template once per process, and a changed file is read again."""

from __future__ import annotations

import json
import shutil

import torch

from tangram.store import save
from tangram.store.format import INDEX_FILE
from tangram.templates import Template, checkpoint_id, libraries, load_template, save_template
from tangram.templates.template import template_path


def _template(ckpt) -> Template:
    return Template(checkpoint_id=checkpoint_id(ckpt), libraries=libraries(), architecture="LlamaForCausalLM",
                    groups=[["w"]], prefill_tokens=4)


def test_an_unchanged_template_is_read_once_and_a_rewritten_one_again(tmp_path, monkeypatch):
    ckpt = tmp_path / "m"
    save({"w": torch.zeros(4)}, ckpt)
    save_template(ckpt, _template(ckpt))
    first = load_template(ckpt)
    assert first is not None and first.prefill_tokens == 4
    reads = []
    real = type(template_path(ckpt)).read_text
    monkeypatch.setattr(type(template_path(ckpt)), "read_text",
                        lambda self, *a, **k: reads.append(self) or real(self, *a, **k))
    assert load_template(ckpt) is first and not reads  # nothing read, hashed or validated again
    path = template_path(ckpt)
    data = json.loads(real(path))
    data["prefill_tokens"] = 9
    path.write_text(json.dumps(data))  # rewritten behind its back: another size and mtime
    again = load_template(ckpt)
    assert again is not None and again.prefill_tokens == 9 and reads
    data["libraries"]["torch"] = "0.0.1"
    path.write_text(json.dumps(data))
    assert load_template(ckpt) is None  # still validated when the file changed
    save_template(ckpt, _template(ckpt))
    assert load_template(ckpt).prefill_tokens == 4


def test_a_checkpoint_rewritten_in_place_invalidates_the_remembered_template(tmp_path):
    ckpt = tmp_path / "m"
    save({"w": torch.zeros(4)}, ckpt)
    save_template(ckpt, _template(ckpt))
    assert load_template(ckpt) is not None
    save({"w": torch.ones(4)}, tmp_path / "other")
    shutil.copy(tmp_path / "other" / INDEX_FILE, ckpt / INDEX_FILE)  # a new index: the template is the old one's
    assert load_template(ckpt) is None
