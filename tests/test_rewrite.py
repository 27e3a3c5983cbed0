"""rewrite/: engines (tiny random Llama through transformers, EDA, Apertium, vLLM's offline API), prompts,
pipeline, store. The server engines (openai, vllm on CPU) are in test_rewrite_engines.py; kill -9 resume
of every engine in test_faults_rewrite.py.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from rewrite.config import RewriteConfig
from rewrite.engines import Request, make_engine, vllm_importable
from rewrite.inputs import read_captions
from rewrite.pipeline import run
from rewrite.pools import DEFAULT_POOLS, load_pool
from rewrite.prompt import TASK, build_prompt, draw_examples
from rewrite.quality import reject_reason, same_text
from rewrite.store import import_laclip, load_rewrites, read_shard, shard_path
from tests.conftest import CAPTIONS, REPO
from tests.rewrite_helpers import needs_vllm, store_contents


@pytest.fixture(scope="session")
def hf_engine(tiny_model):
    return make_engine("hf", tiny_model, batch_size=4, threads=1)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def cfg_for(tmp_path, model, **kw):
    inp = write_lines(tmp_path / "caps.txt", CAPTIONS)
    base = dict(input=str(inp), out=str(tmp_path / "store"), engine="hf", model=model,
                pools=["coco", "human"], shard_size=5, batch_size=4, max_retries=1, progress=False)
    base.update(kw)
    return RewriteConfig(**base)


# --- pools and prompts -------------------------------------------------------------------------------

def test_shipped_pools_have_16_pairs():
    for name in DEFAULT_POOLS:
        assert len(load_pool(name).pairs) >= 16, name


def test_prompt_structure_and_seeded_examples():
    pool = load_pool("coco")
    ex = draw_examples(pool, seed=0, key="k1")
    assert len(ex) == 3 and len(set(ex)) == 3 and all(e in pool.pairs for e in ex)
    assert ex == draw_examples(pool, seed=0, key="k1")                  # same seed, same examples
    assert any(draw_examples(pool, s, "k1") != ex for s in range(1, 5))  # other seeds draw others
    prompt = build_prompt("a dog\non the  beach", ex)
    lines = prompt.split("\n")
    assert lines[0] == TASK
    inputs = [line for line in lines if line.startswith("Input:")]
    assert inputs == [f"Input: {a}" for a, _ in ex] + ["Input: a dog on the beach"]
    assert [line for line in lines if line.startswith("Output:")] == [f"Output: {b}" for _, b in ex] + ["Output:"]
    assert prompt.endswith("Input: a dog on the beach\nOutput:")        # the model answers on this line
    assert len(build_prompt("word " * 500, ex)) < 1500                 # long captions are cut


# --- engines -----------------------------------------------------------------------------------------

def test_hf_engine_samples_n_lines_deterministically(hf_engine):
    pool = load_pool("human")
    reqs = [Request(str(i), c, build_prompt(c, draw_examples(pool, 0, str(i))), seed=i)
            for i, c in enumerate(CAPTIONS[:5])]
    a = hf_engine.generate(reqs, 2)
    assert len(a) == 5 and all(len(x) == 2 and all("\n" not in t for t in x) for x in a)
    assert hf_engine.generate(reqs, 2) == a
    other = [Request(r.key, r.caption, r.prompt, r.seed + 100) for r in reqs]
    assert hf_engine.generate(other, 2) != a


def test_eda_engine():
    from rewrite.eda import synonyms
    assert "domestic dog" in synonyms("dog")
    eng = make_engine("eda", None)
    reqs = [Request(str(i), c, None, seed=7) for i, c in enumerate(CAPTIONS)]
    out = eng.generate(reqs, 3)
    assert out == eng.generate(reqs, 3)
    assert all(len(x) == 3 for x in out)
    assert sum(t != r.caption for x, r in zip(out, reqs) for t in x) > len(reqs)  # most are changed


@pytest.mark.skipif(shutil.which("apertium") is None, reason="Debian apertium apertium-eng-spa not installed")
def test_backtranslate_engine_one_process_per_batch():
    eng = make_engine("backtranslate", None)
    caps = ["a dog running on the beach", "", "the red car is parked", "Christmas light"]
    out = eng.generate([Request(str(i), c, None, 0) for i, c in enumerate(caps)], 1)
    assert len(out) == 4 and out[1] == [""]
    assert out[0][0].lower().startswith("a dog") and "beach" in out[0][0]
    assert out[0][0] != caps[0]  # the round trip changes the wording


@pytest.mark.skipif(shutil.which("apertium") is None, reason="Debian apertium apertium-eng-spa not installed")
def test_backtranslation_repeats_are_kept_once(tmp_path):
    """Asked for 3 rewrites, back-translation gives one text 3 times: the store keeps it once, counts the
    2 repeats as duplicates, and leaves the other 2 slots unfilled."""
    inp = write_lines(tmp_path / "caps.txt", ["a dog running on the beach", "a cat sleeping on a sofa"])
    summary = run(RewriteConfig(input=str(inp), out=str(tmp_path / "bt"), engine="backtranslate",
                                rewrites_per_pool=3, shard_size=5, max_retries=0, progress=False))
    rows = list(load_rewrites(tmp_path / "bt").values())
    assert [len(r) for r in rows] == [1, 1]
    assert summary["counts"]["duplicate"] == 4 and summary["counts"]["unfilled"] == 4
    assert reject_reason("A dog, running on the beach!", "dogs", kept=["a dog running on the beach"]) == "duplicate"


@needs_vllm
@pytest.mark.timeout(600)
@pytest.mark.slow
def test_vllm_offline_engine(tiny_model):
    """vLLM's offline API (what GPU nodes run), here from vLLM's CPU build in .venv-vllm: n samples per
    prompt, per-request seeds, so a caption's rewrites do not depend on the batch it is in."""
    from rewrite.vllm_server import vllm_python
    python = sys.executable if vllm_importable() else str(vllm_python())
    # vLLM spawns its engine process, so the code runs as a script under __main__.
    script = (f"from rewrite.engines import make_engine, Request\n"
              f"if __name__ == '__main__':\n"
              f"    e = make_engine('vllm', {tiny_model!r}, batch_size=4, llm_kwargs=dict(dtype='float32',\n"
              f"                    gpu_memory_utilization=0.1,  # on CPU: the share of RAM for the KV cache\n"
              f"                    enforce_eager=True, max_num_batched_tokens=4096, max_model_len=2048))\n"
              f"    r = [Request(str(i), 'a dog', f'Input: a cat {{i}}\\nOutput:', 1000 * i) for i in range(6)]\n"
              f"    a = e.generate(r, 2); b = e.generate(r, 2)\n"
              f"    e.batch_size = 1; c = e.generate(r, 2)\n"
              f"    assert a == b == c and len(a) == 6 and all(len(x) == 2 for x in a), (a, b, c)\n"
              f"    assert e.generate([Request('0', 'a dog', r[0].prompt, 7)], 2) != a[:1]\n"
              f"    print('ok')\n")
    res = subprocess.run([python, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# --- filter ------------------------------------------------------------------------------------------

def test_filter_reasons():
    ex = [("a cat on a sofa", "a striped cat asleep on a couch")]
    cap = "a dog on the beach"
    assert reject_reason("", cap) == "empty"
    assert reject_reason("  ...  ", cap) == "empty"
    assert reject_reason("A dog on the beach.", cap) == "identical"
    assert reject_reason("a striped cat asleep on a couch", cap, ex) == "copied_example"
    assert reject_reason("A striped cat sleeping on a couch.", cap, ex) == "copied_example"  # near copy
    assert reject_reason("a dog " * 40, cap) == "too_long"
    assert reject_reason("%%% 123 456 ### !!!", cap) == "non_text"
    assert reject_reason("dog dog dog dog on the sand", cap) == "non_text"
    assert reject_reason("a puppy playing on the sandy shore", cap, ex) is None


def test_underscores_separate_words_in_the_filter_and_in_alt_texts():
    """One normaliser (common/text.py): a file-name caption says what its spelled-out rewrite says (the
    shipped store kept 19 such rewrites under the old rule, "bosnia_and_herzegovina" among them)."""
    from packing.builders import alt_texts
    assert reject_reason("Bosnia and Herzegovina.", "bosnia_and_herzegovina") == "identical"
    assert reject_reason("___", "a dog") == "empty"
    assert alt_texts("grinning face", {"name": "grinning_face", "title": "Grinning  face!", "other": "smile"}) \
        == {"other": "smile"}


def test_a_store_made_under_other_text_rules_is_refused_unless_complete(tmp_path):
    """run.json records the filter's text rules: resuming an unfinished store from before (no
    "text_rules": rule 1) would mix two filters, so it is refused; a complete one is only read."""
    import json
    cfg = cfg_for(tmp_path, None, engine="eda", rewrites_per_pool=1, shard_size=6)  # 2 shards
    run(cfg)
    run_json = tmp_path / "store" / "run.json"
    old = json.loads(run_json.read_text())
    assert old.pop("text_rules") == 2
    run_json.write_text(json.dumps(old))
    assert run(cfg)["shards_written"] == 0  # complete: nothing is written, nothing to refuse
    shard_path(cfg.out, "eda", 1).unlink()
    with pytest.raises(ValueError, match="different run .*text_rules: 1 != 2"):
        run(cfg)


# --- pipeline and store ------------------------------------------------------------------------------

def test_pipeline_store_determinism_and_resume_skip(tmp_path, tiny_model, hf_engine):
    cfg = cfg_for(tmp_path, tiny_model)
    s1 = run(cfg, engine=hf_engine)
    assert s1["shards_written"] == 3 * 2 and s1["shards_skipped"] == 0
    store = load_rewrites(cfg.out)
    keys = [k for k, _ in read_captions(cfg.input)]
    assert list(store) == keys and all(len(v) <= 2 for v in store.values())
    header, records = read_shard(shard_path(cfg.out, "coco", 0))
    assert (header["engine"], header["pool"], header["seed"], header["model"]) == ("hf", "coco", 0, tiny_model)
    c = s1["counts"]  # every slot is either a kept rewrite or left unfilled after the retries
    assert c["kept"] + c["unfilled"] == len(CAPTIONS) * 2 == sum(len(v) for v in store.values()) + c["unfilled"]
    assert sum(c[k] for k in ("empty", "identical", "copied_example", "too_long", "non_text")) >= c["unfilled"]
    assert not any(same_text(t, cap) for (key, cap) in read_captions(cfg.input) for t in store[key])
    # A re-run skips everything; a fresh run with the same seed writes identical files.
    assert run(cfg, engine=hf_engine)["shards_written"] == 0
    cfg2 = cfg_for(tmp_path, tiny_model, out=str(tmp_path / "again"))
    run(cfg2, engine=hf_engine)
    assert load_rewrites(cfg2.out) == store
    with pytest.raises(ValueError, match="different run"):
        run(cfg_for(tmp_path, tiny_model, seed=1), engine=hf_engine)


def test_sharding_by_rank(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, None, engine="eda", rewrites_per_pool=2, shard_size=2)  # 6 shards
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    s = run(cfg)
    assert s["rank"] == 1 and s["shards_written"] == 3
    assert sorted(p.name for p in (tmp_path / "store" / "eda").glob("shard-*")) == \
        [f"shard-{i:05d}.jsonl.zst" for i in (1, 3, 5)]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_rewrites(cfg.out)
    cfg.rank, cfg.world_size = 0, 2  # flags win over the environment
    assert run(cfg)["shards_written"] == 3
    store = load_rewrites(cfg.out)
    assert len(store) == len(CAPTIONS) and all(len(v) <= 2 for v in store.values())  # EDA may find no 2nd change


def test_outputs_do_not_depend_on_batch_size(tmp_path, tiny_model, hf_engine):
    """Per-request seeds (eda here; vllm and openai in test_rewrite_engines.py): any batch size gives
    the same store. hf samples a batch from one generator: run.json records its batch size and a resume
    with another one is refused."""
    stores = []
    for batch in (2, 5):
        cfg = cfg_for(tmp_path, None, engine="eda", rewrites_per_pool=2, batch_size=batch,
                      out=str(tmp_path / f"eda{batch}"))
        run(cfg)
        stores.append(store_contents(cfg.out))
    assert stores[0] == stores[1]
    cfg = cfg_for(tmp_path, tiny_model, batch_size=4, shard_size=12, max_retries=0)
    run(cfg, engine=hf_engine)
    cfg.batch_size = 3
    with pytest.raises(ValueError, match="batch_size: 4 != 3"):
        run(cfg, engine=hf_engine)


# --- inputs and LaCLIP import ------------------------------------------------------------------------

def test_laclip_import_and_mismatch(tmp_path):
    csv = tmp_path / "cc3m.csv"
    csv.write_text("relative_image_path,caption\nimg/0.jpg,a dog\nimg/1.jpg,\"a cat, sleeping\"\nimg/2.jpg,a car\n")
    chatgpt = write_lines(tmp_path / "chatgpt.txt", ["a happy dog", "a cat asleep", "a parked car"])
    coco = write_lines(tmp_path / "coco.txt", ["dog photo", "sleeping cat", "car on road"])
    out = import_laclip(csv, [chatgpt, coco], tmp_path / "store", shard_size=2)
    assert load_rewrites(out) == {"img/0.jpg": ["a happy dog", "dog photo"],
                                  "img/1.jpg": ["a cat asleep", "sleeping cat"],
                                  "img/2.jpg": ["a parked car", "car on road"]}
    short = write_lines(tmp_path / "human.txt", ["one", "two"])
    with pytest.raises(ValueError, match=r"human\.txt has 2 lines but .*cc3m\.csv has 3"):
        import_laclip(csv, [chatgpt, short], tmp_path / "store2")


def test_malformed_input_rows_name_file_and_line(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("key,caption\na,ok\nb,too,many\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: expected 2 fields"):
        read_captions(bad_csv)
    bad_header = tmp_path / "header.csv"
    bad_header.write_text("url,text\nx,y\n")
    with pytest.raises(ValueError, match=r"header\.csv:1: header"):
        read_captions(bad_header)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"key": "a", "caption": "x"}\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_captions(bad_jsonl)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"key": "a", "caption": "x"}\n{"key": "a", "caption": "y"}\n')
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate key 'a' \(first on line 1\)"):
        read_captions(dup)
    assert read_captions(write_lines(tmp_path / "c.txt", ["x", "y"])) == [("000000000", "x"), ("000000001", "y")]


def test_cli_one_line_errors(tmp_path):
    """User mistakes end the CLI with one line naming the file and line, exit 2, no traceback."""
    first_lines = {"latin1.txt": "caf\u00e9 au lait\n", "latin1.csv": "key,caption\n",
                   "latin1.jsonl": '{"key": "a", "caption": "ok"}\n'}
    for name, first in first_lines.items():
        path = tmp_path / name
        path.write_bytes(first.encode("utf-8") + "b,cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
        res = subprocess.run([sys.executable, "-m", "rewrite", "--engine", "eda", "--input", str(path), "--out",
                              str(tmp_path / "out"), "--no-progress"], cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [f"rewrite: error: {path}:2: not UTF-8 text (byte 0xe8 at "
                                                   "column 5); re-encode the file as UTF-8"]
    missing = tmp_path / "none.txt"
    res = subprocess.run([sys.executable, "-m", "rewrite", "--engine", "eda", "--input", str(missing), "--out",
                          str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"rewrite: error: caption file {missing} does not exist"]


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "rewrite", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "--rewrites-per-pool" in res.stdout and "--engine" in res.stdout


def test_store_keeps_texts_with_unicode_line_separators(tmp_path):
    """A model once wrote U+2028 inside a rewrite: the shard must read back (lines split at \\n only), and
    the output clean-up turns such separators into spaces."""
    from rewrite.quality import clean_output
    from rewrite.store import write_shard
    records = [{"key": "a", "caption": "flag of Murcia", "rewrites": ["A flag (\u2028\u2028Murcia)"]}]
    path = write_shard(tmp_path, "coco", 0, {"num_captions": 1}, records)
    assert read_shard(path)[1] == records
    assert clean_output(" A flag (\u2028\u2028Murcia)\u2029 ") == "A flag ( Murcia)"


def test_vllm_dtype_is_part_of_the_run(tmp_path, monkeypatch):
    """A store made by the CPU server in float32 (the default) refuses a resume in bfloat16 and back:
    the dtype changes the rewrites. Checked before any engine starts, so no server is needed."""
    if vllm_importable():
        pytest.skip("the offline API reads the dtype from --llm-kwargs only")
    from rewrite.pipeline import vllm_dtype
    write_lines(tmp_path / "caps.txt", CAPTIONS[:2])
    cfg = RewriteConfig(input=str(tmp_path / "caps.txt"), out=str(tmp_path / "store"), engine="vllm",
                        progress=False, fidelity=False)
    assert vllm_dtype(cfg) is None
    (tmp_path / "store").mkdir()
    for pool in cfg.pool_names():  # every shard file present: the run checks run.json and skips them
        (tmp_path / "store" / pool).mkdir()
        shard_path(tmp_path / "store", pool, 0).write_text("")
    run(cfg)
    monkeypatch.setenv("LACLIP_VLLM_DTYPE", "bfloat16")
    assert vllm_dtype(cfg) == "bfloat16"
    with pytest.raises(ValueError, match="vllm_dtype: None != 'bfloat16'"):
        run(cfg)
    monkeypatch.delenv("LACLIP_VLLM_DTYPE")
    cfg.llm_kwargs = {"dtype": "bfloat16"}
    with pytest.raises(ValueError, match="vllm_dtype"):
        run(cfg)
