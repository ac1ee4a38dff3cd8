"""The hub verbs (`hub.push / pull / versions / merge`) end to end against `lora-hub serve` on 127.0.0.1, with
the unmodified huggingface_hub client, PEFT loading from the server, and pushes that die half way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import HUB_TOKEN
from helpers import Relay, model_output, saved_adapter, tiny_gpt2, token_batch
from huggingface_hub import HfApi

import hub
from hub.api import file_hash

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
def repo_id(request) -> str:
    return f"me/{request.node.name[:40].replace('[', '-').strip(']')}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def two_versions(hub_server, tmp_path, repo_id):
    """1.0.0 and 1.1.0 of `repo_id`, from adapters with different weights."""
    dirs = {}
    for seed, version in ((0, "1.0.0"), (1, "1.1.0")):
        dirs[version] = tmp_path / f"adapter-{version}"
        saved_adapter(dirs[version], seed=seed)
        hub.push(dirs[version], repo_id, version=version, message=f"release {version}", endpoint=hub_server.url)
    return dirs


@pytest.mark.parametrize(("wanted", "best"), [
    ("latest", "2.0.0"), ("", "2.0.0"), ("1.0.0", "1.0.0"), ("v1.1.0", "1.1.0"), ("^1.0", "1.10.0"), ("^1", "1.10.0"),
    ("~1.1", "1.1.5"), ("1.1.x", "1.1.5"), ("1.1", "1.1.5"), ("1.*", "1.10.0"), ("^0.2", "0.2.3"),
    ("^0.0.3", "0.0.3"), ("~0.2.1", "0.2.3"), ("2", "2.0.0"),
])
def test_version_ranges(wanted, best):
    available = [hub.Version.parse(v) for v in ("0.0.3", "0.0.4", "0.2.1", "0.2.3", "1.0.0", "1.1.0", "1.1.5",
                                                "1.10.0", "2.0.0")]
    assert str(hub.Range.parse(wanted).best(available)) == best


@pytest.mark.parametrize("bad", ["^1.x", "1.x.3", "abc", "1.2.3.4", "01.2.3", "~", "1.2.3-rc1"])
def test_bad_ranges(bad):
    with pytest.raises(hub.BadSpec, match="is not a version or range"):
        hub.Range.parse(bad)


def _state(url: str, repo_id: str, token: str | None = None) -> tuple:
    """Everything a push may change: refs and the commit list of main."""
    api = HfApi(endpoint=url, token=token)
    refs = api.list_repo_refs(repo_id)
    commits = [c.commit_id for c in api.list_repo_commits(repo_id)]
    return sorted((b.name, b.target_commit) for b in refs.branches), sorted((t.name, t.target_commit) for t in refs.tags), commits


def _same_files(folder: Path, adapter: Path) -> bool:
    return all((folder / f).read_bytes() == (adapter / f).read_bytes() for f in FILES)


def test_push_versions_pull(hub_server, two_versions, tmp_path, repo_id):
    url = hub_server.url
    listed = hub.versions(repo_id, endpoint=url)
    assert [str(v.version) for v in listed] == ["1.0.0", "1.1.0"]
    assert [v.message for v in listed] == ["release 1.0.0", "release 1.1.0"]
    assert {v.base_model for v in listed} == {"tiny-gpt2"}
    assert all(len(v.commit) == 40 for v in listed) and listed[0].commit != listed[1].commit

    for version, adapter in two_versions.items():
        out = hub.pull(f"{repo_id}@{version}", local_dir=tmp_path / f"pulled-{version}", endpoint=url)
        assert _same_files(out, adapter)
    newest = hub.pull(f"{repo_id}@^1.0", endpoint=url)
    assert newest.name == listed[1].commit and _same_files(newest, two_versions["1.1.0"])
    assert hub.pull(repo_id, endpoint=url) == newest  # bare repo id: latest
    with pytest.raises(hub.VersionNotFound, match=r"no version of me/.* matches '\^2.0' \(versions: 1.0.0, 1.1.0\)"):
        hub.pull(f"{repo_id}@^2.0", endpoint=url)

    card = (newest / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "tiny-gpt2"
    assert {"lora", "base_model:adapter:tiny-gpt2"} <= set(meta["tags"])
    assert "| 1.1.0 | this commit | 20" in card and f"| 1.0.0 | {listed[0].commit[:12]} |" in card
    assert "| r | 4 |" in card and "| target_modules | c_attn |" in card

    bumped = hub.push(two_versions["1.0.0"], repo_id, endpoint=url)  # no version: the latest patch + 1
    assert str(bumped.version) == "1.1.1" and bumped.url.endswith(bumped.commit)


def test_existing_version_is_never_overwritten(hub_server, two_versions, tmp_path, repo_id):
    before = _state(hub_server.url, repo_id)
    saved_adapter(tmp_path / "other", seed=7)
    with pytest.raises(hub.VersionExists, match=r"already has version 1\.0\.0 .* nothing was changed: push as 1\.1\.1"):
        hub.push(tmp_path / "other", repo_id, version="1.0.0", endpoint=hub_server.url)
    assert _state(hub_server.url, repo_id) == before
    pulled = hub.pull(f"{repo_id}@1.0.0", endpoint=hub_server.url)
    assert _same_files(pulled, two_versions["1.0.0"])


def test_branch_named_like_a_version_does_not_hide_it(hub_server, two_versions, repo_id):
    api = HfApi(endpoint=hub_server.url)
    api.create_branch(repo_id, branch="v1.0.0", revision="v1.1.0")
    tagged = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}["v1.0.0"]
    for _ in range(2):
        pulled = hub.pull(f"{repo_id}@1.0.0", endpoint=hub_server.url)
        assert pulled.name == tagged and _same_files(pulled, two_versions["1.0.0"])
    assert api.model_info(repo_id, revision="v1.0.0").sha == tagged  # a name both tag and branch is the tag
    assert api.model_info(repo_id, revision="refs/heads/v1.0.0").sha != tagged


def test_default_push_past_the_largest_patch_is_refused(hub_server, tmp_path, repo_id):
    saved_adapter(tmp_path / "adapter")
    hub.push(tmp_path / "adapter", repo_id, version="1.0.999999999", endpoint=hub_server.url)
    before = _state(hub_server.url, repo_id)
    with pytest.raises(hub.BadSpec, match=r"^1\.0\.999999999 has no next patch version .*: give the version to "):
        hub.push(tmp_path / "adapter", repo_id, endpoint=hub_server.url)
    assert _state(hub_server.url, repo_id) == before
    with pytest.raises(hub.BadSpec, match=r"^1\.0\.1000000000 is not a version: each part must be 0 to 999999999$"):
        hub.Version(1, 0, 10**9)
    assert hub.Range.parse("1.0.999999999").high == hub.Version(1, 1, 0)


def test_push_race_loser_gets_version_exists(hub_server, two_versions, tmp_path, repo_id, monkeypatch):
    """Another push lands between this push's look at main and its commit: if it published the same version,
    this one is told so (VersionExists), not to push again."""
    saved_adapter(tmp_path / "loser", seed=8)
    create_commit = HfApi.create_commit

    def racing(version):
        def commit(self, *args, **kwargs):
            monkeypatch.setattr(HfApi, "create_commit", create_commit)
            hub.push(two_versions["1.0.0"], repo_id, version=version, endpoint=hub_server.url)
            return create_commit(self, *args, **kwargs)
        monkeypatch.setattr(HfApi, "create_commit", commit)

    racing("1.2.0")
    with pytest.raises(hub.VersionExists, match=r"already has version 1\.2\.0 .* nothing was changed: push as 1\.2\.1$"):
        hub.push(tmp_path / "loser", repo_id, version="1.2.0", endpoint=hub_server.url)
    racing("1.3.0")
    with pytest.raises(hub.HubError, match="changed while pushing .* push again$") as err:
        hub.push(tmp_path / "loser", repo_id, version="1.4.0", endpoint=hub_server.url)
    assert not isinstance(err.value, hub.VersionExists)
    assert [str(v.version) for v in hub.versions(repo_id, endpoint=hub_server.url)] == ["1.0.0", "1.1.0", "1.2.0",
                                                                                        "1.3.0"]


def test_push_follows_symlinked_files(hub_server, two_versions, tmp_path, repo_id):
    """The folder `pull` returns is a cache snapshot whose files are symlinks into blobs/: pushing it publishes
    the files' contents, as huggingface_hub's own upload does."""
    snapshot = hub.pull(f"{repo_id}@1.0.0", endpoint=hub_server.url)
    assert all((snapshot / f).is_symlink() for f in FILES)
    copy = repo_id + "-copy"
    hub.push(snapshot, copy, endpoint=hub_server.url)
    assert _same_files(hub.pull(f"{copy}@1.0.0", endpoint=hub_server.url), two_versions["1.0.0"])


def test_push_refuses_a_link_out_of_the_folder(hub_server, tmp_path, repo_id):
    """Only links into the folder (or a snapshot's blobs) are followed: a stray one is not published."""
    saved_adapter(tmp_path / "a")
    (tmp_path / "secret").write_text("token")
    (tmp_path / "a" / "notes.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(hub.InvalidAdapter, match=r"notes.txt is a symlink pointing outside the adapter folder"):
        hub.push(tmp_path / "a", repo_id, endpoint=hub_server.url)
    assert not HfApi(endpoint=hub_server.url).repo_exists(repo_id)


def test_push_refuses_pickles_beside_the_adapter(hub_server, tmp_path, repo_id):
    """A Trainer checkpoint folder holds the adapter and pickled training state: none of it is published."""
    saved_adapter(tmp_path / "checkpoint-500")
    for name in ("optimizer.pt", "training_args.bin", "rng_state.pth"):
        (tmp_path / "checkpoint-500" / name).write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    with pytest.raises(hub.InvalidAdapter, match=r"holds pickle files \['optimizer.pt', 'rng_state.pth', "
                                                 r"'training_args.bin'\] .* lora-hub never publishes one"):
        hub.push(tmp_path / "checkpoint-500", repo_id, endpoint=hub_server.url)
    assert not HfApi(endpoint=hub_server.url).repo_exists(repo_id)


def test_invalid_adapter_is_refused_before_sending(hub_server, tmp_path, repo_id):
    saved_adapter(tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}')
    with pytest.raises(hub.InvalidAdapter, match="r must be a positive integer"):
        hub.push(tmp_path / "bad", repo_id, endpoint=hub_server.url)
    assert not HfApi(endpoint=hub_server.url).repo_exists(repo_id)


def test_diverged_adapter_is_refused_before_sending(hub_server, tmp_path, repo_id):
    """validate_adapter reads only the header: push also reads the values, so a NaN adapter (a diverged run),
    which every load refuses, never becomes a version."""
    from safetensors.torch import load_file, save_file

    saved_adapter(tmp_path / "nan")
    weights = tmp_path / "nan" / "adapter_model.safetensors"
    tensors = load_file(weights)
    next(t for k, t in tensors.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(hub.InvalidAdapter, match=r"lora_B\.weight holds NaN or Inf values"):
        hub.push(tmp_path / "nan", repo_id, endpoint=hub_server.url)
    assert not HfApi(endpoint=hub_server.url).repo_exists(repo_id)


def test_pull_offline_from_cache_and_verifies_hashes(hub_server, two_versions, tmp_path, repo_id, monkeypatch):
    online = hub.pull(f"{repo_id}@^1.0", endpoint=hub_server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dead = "http://127.0.0.1:9"  # nothing listens: any request would fail
    assert hub.pull(f"{repo_id}@^1.0", endpoint=dead) == online
    assert hub.pull(f"{repo_id}@latest", endpoint=dead) == online
    with pytest.raises(hub.VersionNotFound, match=r"matches '1\.0\.0' \(versions: 1\.1\.0\); offline"):
        hub.pull(f"{repo_id}@1.0.0", endpoint=dead)

    weights = online / "adapter_model.safetensors"
    blob = weights.resolve()
    assert blob.name == file_hash(weights, "git-sha1")  # the cache names blobs by the hub's hash
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(hub.IntegrityError, match="adapter_model.safetensors has git-sha1 .* the hub recorded"):
        hub.pull(f"{repo_id}@^1.0", endpoint=dead)


def test_pull_offline_from_a_cache_without_symlinks(hub_server, two_versions, repo_id, monkeypatch):
    """HF_HUB_DISABLE_SYMLINKS (or Windows without developer mode): the cache holds copies, which keep no record
    of the hub's hashes. Offline pulls still work, with a warning that names what went unverified."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_SYMLINKS", True)
    online = hub.pull(f"{repo_id}@^1.0", endpoint=hub_server.url)
    assert not (online / "adapter_model.safetensors").is_symlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(UserWarning, match=r"@1\.1\.0: \.gitattributes, README\.md, adapter_config\.json, "
                      r"adapter_model\.safetensors not verified: the cache holds copies"):
        assert hub.pull(f"{repo_id}@^1.0", endpoint="http://127.0.0.1:9") == online


def test_offline_verbs_that_need_the_hub_say_so(hub_server, tmp_path, repo_id, monkeypatch):
    """Offline, versions and push cannot work whatever the cache holds: the error says to go online."""
    saved_adapter(tmp_path / "adapter")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for verb in (lambda: hub.versions(repo_id), lambda: hub.push(tmp_path / "adapter", repo_id)):
        with pytest.raises(hub.Unreachable, match=rf"^offline mode \(HF_HUB_OFFLINE=1\): {hub_server.url} cannot be "
                                                  rf"asked about {repo_id}; unset HF_HUB_OFFLINE"):
            verb()


def test_lfs_upload_path_verifies_sha256(tmp_path, repo_id, monkeypatch):
    """With Xet disabled and the server asking for LFS, the weights travel through the LFS batch API and the
    pull checks them against the hub's sha256."""
    from helpers import point_hf_client

    saved_adapter(tmp_path / "adapter")
    with hub.serve(tmp_path / "root", lfs_threshold=1024) as server:
        point_hf_client(monkeypatch, server.url, tmp_path / "hf", xet=False)
        hub.push(tmp_path / "adapter", repo_id, endpoint=server.url)
        (entry,) = HfApi(endpoint=server.url).get_paths_info(repo_id, ["adapter_model.safetensors"], revision="v1.0.0")
        pulled = hub.pull(repo_id, endpoint=server.url)
    weights = pulled / "adapter_model.safetensors"
    assert entry.lfs is not None and entry.lfs.sha256 == file_hash(weights, "sha256") == weights.resolve().name
    assert _same_files(pulled, tmp_path / "adapter")


def test_xet_client_against_lfs_server_is_told_to_disable_xet(tmp_path, repo_id, monkeypatch):
    """hf_xet reports the server's refusal as a ConnectionError: the push must say what the server said, not
    that it cannot be reached."""
    from helpers import point_hf_client

    saved_adapter(tmp_path / "adapter")
    with hub.serve(tmp_path / "root", lfs_threshold=1024) as server:
        point_hf_client(monkeypatch, server.url, tmp_path / "hf", xet=True)
        with pytest.raises(hub.HubError, match=r"answered HTTP 400 for me/.*: this server does not speak Xet; "
                                               r"upload with HF_HUB_DISABLE_XET=1") as err:
            hub.push(tmp_path / "adapter", repo_id, endpoint=server.url)
    assert not isinstance(err.value, hub.Unreachable)


def test_merge_output_equals_adapter_output(hub_server, tmp_path, repo_id):
    model = saved_adapter(tmp_path / "adapter", seed=3)
    tiny_gpt2(seed=3).save_pretrained(tmp_path / "base")
    hub.push(tmp_path / "adapter", repo_id, endpoint=hub_server.url)
    result = hub.merge(f"{repo_id}@1.0.0", tmp_path / "base", tmp_path / "merged", endpoint=hub_server.url,
                       push_to=repo_id + "-merged")
    assert result.max_diff < 1e-5 and result.dtype == "float32"
    assert HfApi(endpoint=hub_server.url).file_exists(repo_id + "-merged", "model.safetensors")
    from transformers import GPT2LMHeadModel

    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    batch = token_batch(seed=5)
    assert not any("lora" in name for name in merged.state_dict())
    assert torch.allclose(model_output(merged, batch), model_output(model, batch), atol=1e-5, rtol=0)
    assert not torch.allclose(model_output(merged, batch), model_output(tiny_gpt2(seed=3), batch), atol=1e-3)
    with pytest.raises(hub.HubError, match="already exists and is not empty"):
        hub.merge(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    for taken in (repo_id, repo_id + "-merged"):  # an adapter's repo, a merged one: never mixed with the upload
        files = HfApi(endpoint=hub_server.url).list_repo_files(taken)
        with pytest.raises(hub.HubError, match=rf"^{taken} already exists and is not empty \(.*\); push the merged "
                                               rf"model to a new repo$"):
            hub.merge(tmp_path / "adapter", tmp_path / "base", tmp_path / "again", push_to=taken,
                      endpoint=hub_server.url)
        assert HfApi(endpoint=hub_server.url).list_repo_files(taken) == files
    assert not (tmp_path / "again").exists()  # refused before merging


def test_peft_loads_a_version_from_the_server(hub_server, two_versions, tmp_path, repo_id):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_gpt2(seed=0), repo_id, revision="v1.0.0").eval()
    ours = saved_adapter(tmp_path / "again", seed=0)
    batch = token_batch(seed=5)
    assert torch.allclose(model_output(peft_model, batch), model_output(ours, batch), atol=1e-5, rtol=0)
    assert not torch.allclose(model_output(peft_model, batch), model_output(tiny_gpt2(seed=0), batch), atol=1e-3)


def test_token_never_in_output(hub_token, tmp_path, repo_id, capfd):
    url = hub_token.url
    saved_adapter(tmp_path / "adapter")
    result = hub.push(tmp_path / "adapter", repo_id, endpoint=url)  # HF_TOKEN holds the token
    listed = hub.versions(repo_id, endpoint=url)
    pulled = hub.pull(repo_id, endpoint=url)
    with pytest.raises(hub.RepoNotFound, match=r"not found on .* \(or it is private"):  # no token: invisible
        hub.versions(repo_id, endpoint=url, token=False)
    with pytest.raises(hub.AuthError, match="refused the token .* set HF_TOKEN"):
        hub.versions(repo_id, endpoint=url, token=HUB_TOKEN + "x")
    with pytest.raises(hub.AuthError, match="refused the token"):
        hub.push(tmp_path / "adapter", repo_id, version="2.0.0", endpoint=url, token=False)
    seen = [repr(result), repr(listed), *capfd.readouterr()]
    seen += [p.read_text(errors="replace") for p in pulled.iterdir()]
    seen += [p.read_text(errors="replace") for p in hub_token.root.rglob("*") if p.is_file()]
    assert not [s for s in seen if HUB_TOKEN in s]


def test_failed_tag_reports_and_retry_finishes(hub_server, two_versions, tmp_path, repo_id):
    before_tags = _state(hub_server.url, repo_id)[1]
    saved_adapter(tmp_path / "next", seed=5)
    relay = Relay(hub_server.url, drop=b"/tag/")
    try:
        with pytest.raises(hub.PushIncomplete, match=r"committed [0-9a-f]{12} to me/.* but tagging v1\.2\.0 failed "
                                                     r".* run the same push again to finish it"):
            hub.push(tmp_path / "next", repo_id, version="1.2.0", endpoint=relay.url)
    finally:
        relay.close()
    assert _state(hub_server.url, repo_id)[1] == before_tags
    assert [str(v.version) for v in hub.versions(repo_id, endpoint=hub_server.url)] == ["1.0.0", "1.1.0"]
    assert str(hub.push(tmp_path / "next", repo_id, version="1.2.0", endpoint=hub_server.url).version) == "1.2.0"
    assert _same_files(hub.pull(f"{repo_id}@1.2.0", endpoint=hub_server.url),
                       tmp_path / "next")


def test_client_killed_mid_upload_leaves_old_state(hub_server, two_versions, tmp_path, repo_id):
    before = _state(hub_server.url, repo_id)
    saved_adapter(tmp_path / "next", seed=6, r=32, targets=("c_attn", "c_fc"))  # ~200 KB: several chunks
    relay = Relay(hub_server.url, stall_after=64 << 10)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    child = subprocess.Popen([str(Path(sys.executable).parent / "lora-hub"), "push", str(tmp_path / "next"), repo_id,
                              "--version", "1.2.0", "--endpoint", relay.url], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert relay.stalled.wait(60), "the push never got to uploading"
        assert relay.request.startswith(b"POST /api/models/" + repo_id.encode() + b"/commit/main ")
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        relay.close()  # the server sees the connection die half way through the commit's body
    assert _state(hub_server.url, repo_id) == before
    result = hub.push(tmp_path / "next", repo_id, version="1.2.0", endpoint=hub_server.url)
    assert [str(v.version) for v in hub.versions(repo_id, endpoint=hub_server.url)] == ["1.0.0", "1.1.0", "1.2.0"]
    pulled = hub.pull(f"{repo_id}@1.2.0", endpoint=hub_server.url)
    assert pulled.name == result.commit and _same_files(pulled, tmp_path / "next")
    assert json.loads((pulled / "adapter_config.json").read_text())["r"] == 32


def test_merge_failures_are_hub_errors(tmp_path):
    saved_adapter(tmp_path / "adapter")
    tiny_gpt2(n_embd=48).save_pretrained(tmp_path / "wider")
    with pytest.raises(hub.InvalidAdapter, match=r"does not fit the base model .* has shape \[4, 32\]"):
        hub.merge(tmp_path / "adapter", tmp_path / "wider", tmp_path / "m1")

    pickled = tiny_gpt2()  # a pickle checkpoint is refused, never unpickled
    pickled.config.save_pretrained(tmp_path / "pickled")
    torch.save(pickled.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(hub.HubError, match=r"has only pickle weights .* convert it to safetensors"):
        hub.merge(tmp_path / "adapter", tmp_path / "pickled", tmp_path / "m2")
    with pytest.raises(hub.HubError, match="cannot load the base model"):
        hub.merge(tmp_path / "adapter", tmp_path / "adapter", tmp_path / "m3")
    tiny_gpt2().save_pretrained(tmp_path / "truncated")  # an interrupted copy of the base
    with open(tmp_path / "truncated" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(hub.HubError, match=r"^cannot load the base model from .*truncated: .*header"):
        hub.merge(tmp_path / "adapter", tmp_path / "truncated", tmp_path / "m3")

    tiny_gpt2().save_pretrained(tmp_path / "base")  # GPT-2 ties lm_head to wte: folding into it would change both
    saved_adapter(tmp_path / "head-adapter", targets=("lm_head",))
    with pytest.raises(hub.HubError, match="cannot fold the adapter .*tied weights"):
        hub.merge(tmp_path / "head-adapter", tmp_path / "base", tmp_path / "m4")
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 5))
