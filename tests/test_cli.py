"""`lora-hub`, the CLI: every verb works, and every error path is one readable line on stderr with a non-zero
exit code, never a traceback. Most cases run in-process (typer's CliRunner); a few run the real executable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from helpers import Relay, saved_adapter, tiny_gpt2
from typer.testing import CliRunner

import lightning_lora
from hub.cli import app
from lightning_lora import validate_adapter

LORA_HUB = str(Path(sys.executable).parent / "lora-hub")


def run(*args, env: dict | None = None, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert result.exit_code == code, f"lora-hub {' '.join(map(str, args))}: {result.output}{result.stderr}"
    return result


def one_line_error(result, pattern: str) -> None:
    import re

    err = result.stderr
    assert "Traceback" not in result.output + err
    assert len(err.strip().splitlines()) == 1, f"want one line on stderr, got {err!r}"
    assert re.search(pattern, err), f"{pattern!r} not in {err!r}"


@pytest.fixture
def published(hub_server, tmp_path):
    """A repo on the server with version 1.0.0, and the adapter folder it came from."""
    repo = f"me/cli-{uuid.uuid4().hex[:6]}"
    saved_adapter(tmp_path / "adapter")
    out = run("push", tmp_path / "adapter", repo, "--version", "1.0.0", "-m", "first release")
    assert out.stdout.startswith(f"pushed {repo} 1.0.0 (commit ")
    return repo, tmp_path / "adapter"


def test_verbs(hub_server, published, tmp_path):
    repo, adapter = published
    table = run("versions", repo, "--endpoint", hub_server.url).stdout
    assert "1.0.0" in table and "first release" in table and "tiny-gpt2" in table

    pulled = Path(run("pull", f"{repo}@^1.0", "--to", tmp_path / "pulled").stdout.strip())
    assert pulled == tmp_path / "pulled"
    assert (pulled / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()

    for target in (adapter, f"{repo}@1.0.0"):
        shown = run("info", target).stdout
        assert "tiny-gpt2" in shown and "4 / 8" in shown and "c_attn" in shown and "trainable parameters" in shown

    tiny_gpt2(seed=0).save_pretrained(tmp_path / "base")
    merged = run("merge", repo, "--base", tmp_path / "base", "--out", tmp_path / "merged", "--dtype", "float16").stdout
    assert "merged into" in merged and "(float16)" in merged and "max |merged - adapter|" in merged
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_error_paths(hub_server, published, tmp_path):
    repo, adapter = published
    (tmp_path / "empty").mkdir()
    cases = {
        "repo not found": (["versions", "me/nope"], r"repo me/nope not found on http://127\.0\.0\.1:\d+", 1),
        "version not found": (["pull", f"{repo}@2.0.0"], r"no version of .* matches '2\.0\.0' \(versions: 1\.0\.0\)", 1),
        "version exists": (["push", adapter, repo, "--version", "1.0.0"], r"already has version 1\.0\.0", 1),
        "invalid adapter": (["push", tmp_path / "empty", repo], r"invalid adapter: .*empty has no adapter_config", 1),
        "not an adapter": (["info", tmp_path / "empty"], r"invalid adapter: ", 1),
        "unreachable": (["versions", repo, "--endpoint", "http://127.0.0.1:9"],
                        r"cannot reach http://127\.0\.0\.1:9 .* set --endpoint or HF_ENDPOINT", 1),
        "endpoint without a scheme": (["pull", repo, "--endpoint", "127.0.0.1:9"],
                                      r"the endpoint '127\.0\.0\.1:9' is not an http:// or https:// URL", 1),
        "bad spec": (["pull", f"{repo}@^1.x"], r"'\^1\.x' is not a version or range", 2),
        "bad repo id": (["versions", "../etc"], r"'\.\./etc' is not a repo id", 2),
        "repo id ending in .git": (["pull", "me/adapter.git@1.0.0"], r"'me/adapter\.git' is not a repo id", 2),
        "bad version": (["push", adapter, repo, "--version", "one"], r"'one' is not a version", 2),
        "bad dtype": (["merge", adapter, "--base", tmp_path, "--out", tmp_path / "m", "--dtype", "int8"],
                      r"dtype 'int8' is not supported", 1),
        "merge into existing": (["merge", adapter, "--base", tmp_path, "--out", tmp_path], r"already exists", 1),
        "missing base folder": (["merge", adapter, "--base", "./no-base", "--out", tmp_path / "m"],
                                r"no folder '\./no-base', and '\./no-base' is not a repo id", 2),
        "missing adapter folder": (["info", "./no-adapter"],
                                   r"no folder '\./no-adapter', and '\./no-adapter' is not a repo id", 2),
    }
    for name, (args, pattern, code) in cases.items():
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == code, f"{name}: exit {result.exit_code}, {result.output}"
        one_line_error(result, pattern)


def test_auth_failure_is_one_line_without_the_token(hub_token, tmp_path):
    saved_adapter(tmp_path / "adapter")
    wrong = HUB_TOKEN + "-wrong"
    result = CliRunner().invoke(app, ["push", str(tmp_path / "adapter"), "me/private"], env={"HF_TOKEN": wrong})
    assert result.exit_code == 1
    one_line_error(result, r"refused the token for me/private \(HTTP 401\): set HF_TOKEN")
    assert wrong not in result.output + result.stderr and HUB_TOKEN not in result.output + result.stderr
    pasted = "\u200b" + HUB_TOKEN  # a zero-width space copied with it: the client cannot even send it
    result = CliRunner().invoke(app, ["versions", "me/private"], env={"HF_TOKEN": pasted})
    assert result.exit_code == 1
    one_line_error(result, r"the token for http://127\.0\.0\.1:\d+ \(HF_TOKEN or `hf auth login`\) holds a character "
                           r"that is not ASCII \(pasted with an invisible one\?\): set it again$")
    assert HUB_TOKEN not in result.output + result.stderr


def test_real_executable_error(hub_server):
    env = {**os.environ, "HF_ENDPOINT": hub_server.url}
    bad = subprocess.run([LORA_HUB, "pull", "me/missing@1.0.0"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    want = f"error: repo me/missing not found on {hub_server.url} (or it is private and your token may not see it)"
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [want]


def test_download_failure_is_one_line(hub_server, published, tmp_path):
    """The connection dies on every file download: the client retries, logging warnings as it goes; the CLI
    still prints one line."""
    repo, _ = published
    relay = Relay(hub_server.url, drop=f"GET /{repo}/resolve/".encode())
    try:
        env = {**os.environ, "HF_HOME": str(tmp_path / "fresh-home")}
        bad = subprocess.run([LORA_HUB, "pull", repo, "--endpoint", relay.url], env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    finally:
        relay.close()
    want = f"error: cannot reach {relay.url} (RemoteProtocolError); is `lora-hub serve` running? set --endpoint"
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [want + " or HF_ENDPOINT"], bad.stderr


def test_a_warning_is_one_line(hub_server, published, tmp_path):
    """Offline, a cache of copies (symlinks disabled) cannot be verified: the warning is one line, no source line."""
    repo, _ = published
    env = {**os.environ, "HF_HOME": str(tmp_path / "copies-home"), "HF_HUB_DISABLE_SYMLINKS": "1"}
    subprocess.run([LORA_HUB, "pull", repo], env=env, capture_output=True, timeout=120, check=True)
    offline = subprocess.run([LORA_HUB, "pull", repo], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                             text=True, timeout=120, check=True)
    lines = offline.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {repo}@1.0.0: .gitattributes, README.md"), lines
    assert lines[0].endswith("not verified: the cache holds copies, which keep no record of the hub's hashes "
                             "(symlinks disabled); pull online to verify")


def test_serve(tmp_path):
    server = subprocess.Popen([LORA_HUB, "serve", "--root", str(tmp_path / "root"), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = server.stdout.readline()
        assert banner.startswith(f"lora-hub serving {tmp_path / 'root'} at http://127.0.0.1:"), banner
        url = banner.split(" at ")[1].split()[0]
        from huggingface_hub import HfApi

        assert HfApi(endpoint=url).repo_exists("me/none") is False
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "stopped" in out and "Traceback" not in err


def test_serve_on_all_interfaces_without_a_token_warns(tmp_path):
    server = subprocess.Popen([LORA_HUB, "serve", "--root", str(tmp_path / "root"), "--host", "0.0.0.0", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().split(" at ")[1].split()[0].rsplit(":", 1)[1]
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    want = (f"warning: 0.0.0.0 is reachable from other machines and there is no --token: anyone who can reach port "
            f"{port} can push to every repo and read the private ones; set LORA_HUB_TOKEN (or --token)")
    assert err.splitlines()[:1] == [want], err


def test_serve_refuses_an_empty_token(tmp_path):
    bad = subprocess.run([LORA_HUB, "serve", "--root", str(tmp_path / "root"), "--port", "0", "--token", ""],
                         capture_output=True, text=True, timeout=60, check=False)  # a server that starts: timeout
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: --token: the server token is empty: give a non-empty token, or none for a server without auth"]


def test_merge_and_argument_errors_are_labelled(tmp_path):
    saved_adapter(tmp_path / "adapter")
    tiny_gpt2(n_embd=48).save_pretrained(tmp_path / "wider")
    bad = subprocess.run([LORA_HUB, "merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "wider"), "--out",
                          str(tmp_path / "m")], capture_output=True, text=True, timeout=120, check=False)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert lines[0].startswith(f"error: invalid adapter: {tmp_path / 'adapter'} does not fit the base model in ")
    result = run("combine", tmp_path / "adapter", tmp_path / "adapter", "--out", tmp_path / "c", "--method", "bogus",
                 code=1)
    one_line_error(result, r"^error: invalid arguments: method must be one of")
    before = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    result = run("combine", tmp_path / "adapter", tmp_path / "adapter", "--out", tmp_path / "adapter", code=1)
    one_line_error(result, r"already exists and is not empty; choose another --out or delete it$")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == before
    assert validate_adapter(tmp_path / "adapter").config.r == 4  # an input is never overwritten


def test_user_text_is_printed_verbatim(hub_server, tmp_path):
    """Commit messages, paths and specs are the user's text, not rich markup: brackets and :emoji: codes print as typed."""
    repo = f"me/cli-{uuid.uuid4().hex[:6]}"
    saved_adapter(tmp_path / "adapter")
    run("push", tmp_path / "adapter", repo, "-m", "[/]a [b]c[/b] :bug:")
    assert "[/]a [b]c[/b] :bug:" in run("versions", repo).stdout
    target = tmp_path / "exp[lr=1e-4]" / "[red]out:thumbs_up:"
    assert run("pull", repo, "--to", target).stdout.strip() == str(target)
    one_line_error(run("pull", f"{repo}@[/]1", code=2), r"'\[/\]1' is not a version or range")


@pytest.mark.parametrize(("args", "pattern"), [
    (["push"], r"^error: Missing argument 'adapter_dir'; see `lora-hub push --help`$"),
    (["frob"], r"^error: No such command 'frob'; see `lora-hub --help`$"),
    (["pull", "me/a", "--too", "x"], r"^error: No such option: --too \(Possible options: --to\); see `lora-hub pull --help`$"),
    (["serve", "--port", "abc"], r"^error: Invalid value for '--port': .*; see `lora-hub serve --help`$"),
    (["serve", "--port", "99999"], r"^error: Invalid value for '--port': .*65535; see `lora-hub serve --help`$"),
])
def test_usage_errors_are_one_line(args, pattern):
    """Click's own errors (before a verb runs) end like the verbs' errors: one line, exit code 2."""
    one_line_error(run(*args, code=2), pattern)


def test_version_and_exit_codes_in_help():
    assert run("--version").stdout == f"lora-hub {lightning_lora.__version__}\n"
    assert "Exit status: 0 done; 1 failed" in " ".join(run("--help").stdout.split())


def test_a_file_given_for_a_folder_is_named(hub_server, tmp_path, monkeypatch):
    """`out/adapter_model.safetensors` reads like a repo id: it is refused as a file, not looked up on the hub."""
    saved_adapter(tmp_path / "adapter")
    tiny_gpt2().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    for args in (["info", "adapter/adapter_model.safetensors"],
                 ["merge", "adapter", "--base", "base/model.safetensors", "--out", "merged"]):
        file = args[-1] if args[0] == "info" else args[3]
        one_line_error(run(*args, code=2), rf"^error: '{file}' is a file, not a folder: give the folder that holds it$")
    assert not (tmp_path / "merged").exists()


def test_compare_adapters_of_different_bases_is_labelled(tmp_path):
    saved_adapter(tmp_path / "narrow")
    saved_adapter(tmp_path / "wide", n_embd=48)
    result = run("compare", tmp_path / "narrow", tmp_path / "wide", code=1)
    one_line_error(result, r"^error: invalid adapter: layer 'transformer\.h\.0\.attn\.c_attn' has inputs of shape "
                           r"\[32\] in the first adapter and \[48\] in the second: they were trained on different base")


def test_serve_on_a_port_in_use_says_so(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run("serve", "--root", tmp_path / "root", "--port", port, code=1)
    one_line_error(result, rf"^error: cannot listen on 127\.0\.0\.1:{port}: Address already in use; choose another "
                           r"--port \(0: any free one\) or --host$")


def test_merge_into_the_current_empty_folder(tmp_path, monkeypatch):
    """`--out .` in an empty folder (or an empty mount point) is filled; renaming over it failed after the merge."""
    saved_adapter(tmp_path / "adapter")
    tiny_gpt2().save_pretrained(tmp_path / "base")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert "merged into ." in run("merge", tmp_path / "adapter", "--base", tmp_path / "base", "--out", ".").stdout
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]


def test_out_that_is_a_file_is_refused(tmp_path):
    saved_adapter(tmp_path / "adapter")
    tiny_gpt2().save_pretrained(tmp_path / "base")
    (tmp_path / "taken").write_text("mine")
    for args in (["merge", tmp_path / "adapter", "--base", tmp_path / "base"], ["combine", tmp_path / "adapter"]):
        result = run(*args, "--out", tmp_path / "taken", code=1)
        one_line_error(result, r"taken already exists and is a file; choose another --out or delete it$")
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_failed_pull_leaves_the_earlier_version_whole(hub_server, published, tmp_path):
    """Pulling 1.0.1 over 1.0.0 fails at the weights (here a folder stands in their place): the config stays
    1.0.0's, not 1.0.1's beside 1.0.0's weights."""
    repo, _ = published
    saved_adapter(tmp_path / "r8", r=8)
    run("push", tmp_path / "r8", repo)
    run("pull", f"{repo}@1.0.0", "--to", tmp_path / "x")
    (tmp_path / "x" / "adapter_model.safetensors").unlink()
    (tmp_path / "x" / "adapter_model.safetensors").mkdir()
    one_line_error(run("pull", f"{repo}@1.0.1", "--to", tmp_path / "x", code=1), r"^error: Is a directory: ")
    assert '"r": 4' in (tmp_path / "x" / "adapter_config.json").read_text()
    assert not list((tmp_path / "x").glob(".*.tmp"))


def test_to_that_is_a_file_is_refused(hub_server, published, tmp_path):
    repo, _ = published
    (tmp_path / "taken").write_text("mine")
    result = run("pull", repo, "--to", tmp_path / "taken", code=1)
    one_line_error(result, r"^error: .*taken already exists and is a file; choose another --to \(a folder\) or delete it$")
    assert (tmp_path / "taken").read_text() == "mine"
    assert not any((tmp_path / "hf-home").rglob("*.safetensors")), "downloaded before refusing"


def test_merge_checks_its_arguments_before_downloading(hub_server, published, tmp_path):
    """A taken --out or a wrong --dtype is refused before the adapter and the base (gigabytes, for a real base)
    are downloaded, not after."""
    repo, _ = published
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    for options, pattern in ((["--out", tmp_path / "taken"], r"taken already exists and is not empty"),
                             (["--out", tmp_path / "m", "--dtype", "fp16"], r"dtype 'fp16' is not supported")):
        one_line_error(run("merge", f"{repo}@1.0.0", "--base", "me/some-base", *options, code=1), pattern)
    assert not any((tmp_path / "hf-home").rglob("*.safetensors")), "something was downloaded"


def test_a_png_that_cannot_be_written_is_named(tmp_path):
    """The error names the --png the user gave, not the temporary file written beside it."""
    saved_adapter(tmp_path / "adapter")
    (tmp_path / "phi.png").mkdir()
    result = run("compare", tmp_path / "adapter", tmp_path / "adapter", "--png", tmp_path / "phi.png", code=1)
    one_line_error(result, rf"^error: Is a directory: {tmp_path / 'phi.png'}$")
