"""``lora-hub``: the typer app over `hub.api`. Argument parsing and rich output only; the verbs live in api.

Every command is registered with `command`, which turns any failure into one line on stderr and a non-zero
exit code (never a traceback); the app's group (`_Group`) does the same for Click's usage errors. A new verb
is a function here decorated with ``@command()``.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import lightning_lora
from lightning_lora.analysis import compare_subspaces, plot_similarity
from lightning_lora.combine import METHODS
from lightning_lora.combine import combine as combine_adapters
from lightning_lora.config import ConfigError
from lightning_lora.io import AdapterError

from . import api
from .errors import HubError
from .merging import check_out_dir

#: Click's exceptions, from the click typer runs on (recent typers carry their own copy: not `import click`).
_click_errors = sys.modules[typer.BadParameter.__module__]


class _Group(typer.core.TyperGroup):
    """The app's group: Click's usage errors (a missing argument, an unknown option or command, a value of the
    wrong type) end in one line too, naming the help to read, instead of the usage, a hint and a rich box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # an Exit's code; None when a verb returns
        except _click_errors.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `lora-hub`: the help is printed already
                sys.exit(err.exit_code)
            where = err.ctx.command_path if err.ctx else "lora-hub"
            code = _say_error(f"{err.format_message().rstrip('.')}; see `{where} --help`", err.exit_code)
        except _click_errors.ClickException as err:
            code = _say_error(err.format_message(), err.exit_code)
        except typer.Abort:
            code = _say_error("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(name="lora-hub", help="Version, share and merge LoRA adapters through a Hugging Face-compatible "
                  "hub.", epilog="Exit status: 0 done; 1 failed (one line on stderr says why); 2 a usage error (a missing "
                  "or unknown argument or option, a value of the wrong type, a malformed repo id, version or range); "
                  "130 interrupted.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, cls=_Group)
# No markup, no emoji codes: what is printed holds the user's own text (paths, repo ids, commit messages), in which
# rich would read "[...]" as a style tag, dropping it or failing on an unmatched "[/]", and ":bug:" as an emoji.
console = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
_status = Console(stderr=True, markup=False, emoji=False)

def _print_version(value: bool) -> None:
    if value:
        console.print(f"lora-hub {lightning_lora.__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """The options of `lora-hub` itself (before the command)."""


Endpoint = Annotated[str | None, typer.Option(
    "--endpoint", envvar="HF_ENDPOINT", show_envvar=True,
    help="Hub URL, e.g. http://127.0.0.1:8000 (the token comes from HF_TOKEN or `hf auth login`).")]
F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 1) -> None:
    """Print `message` as one line on stderr and exit with `code`."""
    raise typer.Exit(_say_error(message, code))


def _say_error(message: str, code: int) -> int:
    """Print `message` as one line on stderr; returns `code`."""
    typer.echo("error: " + " ".join(str(message).split()), err=True)
    return code


def command(*args, **kwargs) -> Callable[[F], F]:
    """`app.command`, with every exception reported as one line and a non-zero exit."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except HubError as err:
                fail(str(err), err.exit_code)
            except AdapterError as err:
                fail(f"invalid adapter: {err}")
            except ConfigError as err:  # the engine's checks of what the command was given (combine's options)
                fail(f"invalid arguments: {err}")
            except KeyboardInterrupt:
                fail("interrupted", 130)
            except OSError as err:
                fail(f"{err.strerror or type(err).__name__}: {err.filename or err}")
            except Exception as err:  # noqa: BLE001 - the promise is one line, never a traceback
                fail(f"unexpected {type(err).__name__}: {err}")

        app.command(*args, **kwargs)(run)
        return fn

    return register


@command()
def push(
    adapter_dir: Annotated[Path, typer.Argument(help="Folder holding adapter_config.json + adapter_model.safetensors.")],
    repo_id: Annotated[str, typer.Argument(help="namespace/name on the hub.")],
    version: Annotated[str | None, typer.Option(help="MAJOR.MINOR.PATCH; default: the latest patch + 1.")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="What changed.")] = None,
    public: Annotated[bool, typer.Option("--public", help="Create the repo public (default private); an existing repo keeps its visibility.")] = False,
    endpoint: Endpoint = None,
) -> None:
    """Validate an adapter, commit it with its model card, and tag it as a new version."""
    with _transfer(f"pushing {adapter_dir} to {repo_id}"):
        result = api.push(adapter_dir, repo_id, version=version, message=message, private=not public,
                          endpoint=endpoint)
    console.print(f"pushed {result.repo_id} {result.version} (commit {result.commit[:12]})  {result.url}")


@command()
def pull(
    spec: Annotated[str, typer.Argument(help="user/repo, user/repo@1.2.0, @latest or a range like @^1.2.")],
    to: Annotated[Path | None, typer.Option("--to", help="Copy the files here (default: the cache's folder).")] = None,
    endpoint: Endpoint = None,
) -> None:
    """Resolve a version, download it, verify its hashes and validate it; prints the local folder."""
    with _transfer(f"pulling {spec}"):
        path = api.pull(spec, local_dir=to, endpoint=endpoint)
    console.print(str(path))


@command()
def versions(repo_id: Annotated[str, typer.Argument(help="namespace/name on the hub.")], endpoint: Endpoint = None) -> None:
    """List a repo's versions, oldest first."""
    rows = api.versions(repo_id, endpoint=endpoint)
    if not rows:
        console.print(f"{repo_id} has no versions yet")
        return
    table = Table(title=f"{repo_id}: versions")
    for name in ("version", "commit", "date", "message", "base model"):
        table.add_column(name)
    for v in rows:
        table.add_row(str(v.version), v.commit[:12], v.date, v.message, v.base_model or "")
    console.print(table)


@command()
def merge(
    spec: Annotated[str, typer.Argument(help="An adapter folder or a spec like user/repo@^1.2.")],
    base: Annotated[str, typer.Option("--base", help="The base model: a folder or a repo id on the endpoint.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model (new or empty).")],
    dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16 (default: the base's).")] = None,
    push_to: Annotated[str | None, typer.Option("--push-to", help="Also upload the merged model here.")] = None,
    endpoint: Endpoint = None,
) -> None:
    """Fold an adapter into its base and save a plain transformers model."""
    with _transfer(f"merging {spec} into {base}"):
        result = api.merge(spec, base, out, dtype=dtype, push_to=push_to, endpoint=endpoint)
    console.print(f"merged into {result.path} ({result.dtype}); max |merged - adapter| on a probe batch: "
                  f"{result.max_diff:.3g}" + (f"; uploaded to {result.url}" if result.url else ""))


@command()
def info(
    dir_or_spec: Annotated[str, typer.Argument(help="An adapter folder or a spec like user/repo@1.0.0.")],
    endpoint: Endpoint = None,
) -> None:
    """Show an adapter's config, trainable parameters, base model and size."""
    with _transfer(f"reading {dir_or_spec}"):
        adapter = api.info(dir_or_spec, endpoint=endpoint)
    config = adapter.config
    table = Table(title=str(adapter.path), show_header=False)
    for key, value in (
        ("base model", adapter.base_model or "unknown"),
        ("r / alpha", f"{config.r} / {config.alpha:g}"),
        ("target modules", ", ".join(config.target_modules) if isinstance(config.target_modules, list)
         else str(config.target_modules)),
        ("modules to save", ", ".join(config.modules_to_save or []) or "none"),
        ("trainable parameters", f"{adapter.num_params:,}"),
        ("tensors", str(len(adapter.shapes))),
        ("size", f"{adapter.size_bytes:,} bytes"),
    ):
        table.add_row(key, value)
    console.print(table)


@command()
def combine(
    adapters: Annotated[list[str], typer.Argument(help="Adapter folders or specs like user/repo@^1.2, same base.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the combined adapter, PEFT format (new or empty).")],
    weights: Annotated[list[float] | None, typer.Option(
        "--weights", help="One per adapter: --weights 0.7 0.3 (a negative one as --weights=-0.3). Default: equal, "
        "summing to 1.")] = None,
    method: Annotated[str, typer.Option(help=f"{' | '.join(METHODS)}: cat is the exact weighted sum of the updates, "
                                        "svd that sum truncated to --r, linear the average of the factors.")] = "cat",
    r: Annotated[int | None, typer.Option("--r", help="svd: the rank to keep (default: the largest input rank).")] = None,
    endpoint: Endpoint = None,
) -> None:
    """Build one adapter from several trained on the same base."""
    adapters, weights = _adapters_and_weights(adapters, weights)
    check_out_dir(out)
    with _transfer(f"reading {len(adapters)} adapters"):
        inputs = [api.info(a, endpoint=endpoint) for a in adapters]
    result = combine_adapters(inputs, weights or [1 / len(inputs)] * len(inputs), method=method, r=r)
    path = result.save(out)
    console.print(f"wrote {path}: {method} of {len(inputs)} adapters, r={result.config.r}"
                  + (f", discarded energy {result.total_discarded_energy:.4%}" if method == "svd" else ""))


@command()
def compare(
    first: Annotated[str, typer.Argument(help="An adapter folder or spec.")],
    second: Annotated[str, typer.Argument(help="Another adapter of the same base.")],
    png: Annotated[Path | None, typer.Option("--png", help="Also write the phi(i, j) heatmaps here.")] = None,
    endpoint: Endpoint = None,
) -> None:
    """The LoRA paper's subspace similarity phi between two adapters' A factors, per layer."""
    with _transfer(f"reading {first} and {second}"):
        layers = compare_subspaces(api.info(first, endpoint=endpoint), api.info(second, endpoint=endpoint))
    table = Table(title=f"phi(i, j) = ||V1_i^T V2_j||_F^2 / min(i, j): {first} vs {second}")
    for name in ("layer", "r1 x r2", "phi(1, 1)", "phi(1, r2)", "phi(r1, r2)", "mean"):
        table.add_column(name, justify="left" if name == "layer" else "right", overflow="fold")
    for layer in layers:
        r1, r2 = layer.grid.shape
        table.add_row(layer.path, f"{r1} x {r2}", *(f"{v:.3f}" for v in (
            layer.phi(1, 1), layer.phi(1, r2), layer.phi(r1, r2), layer.mean)))
    table.add_section()
    table.add_row("all layers", "", "", "", "", f"{sum(x.mean for x in layers) / len(layers):.3f}", style="bold")
    console.print(table)
    if png is not None:
        console.print(f"wrote {plot_similarity(layers, png, title=f'{first} vs {second}')}")


def _adapters_and_weights(tokens: list[str], weights: list[float] | None) -> tuple[list[str], list[float]]:
    """Click gives an option one value, so ``A B --weights 0.7 0.3`` arrives as tokens [A, B, 0.3] and weights
    [0.7]: numbers among the tokens that are not folders are the remaining weights, in order."""
    adapters, extra = [], []
    for token in tokens:
        number = _number(token)
        if number is None or Path(token).is_dir():
            adapters.append(token)
        else:
            extra.append(number)
    return adapters, [*(weights or []), *extra]


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


@command()
def serve(
    root: Annotated[Path, typer.Option(help="Where repos are stored.")] = Path("lora-hub-data"),
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    token: Annotated[str | None, typer.Option(envvar="LORA_HUB_TOKEN", show_envvar=True, show_default=False,
                                              help="Require this token for writes and private repos.")] = None,
) -> None:
    """Run a Hugging Face Hub-compatible server for adapters (Ctrl-C stops it)."""
    from .server import serve as start

    try:
        server = start(root, host=host, port=port, token=token, log=True)
    except ValueError as err:  # an empty --token
        raise HubError(f"--token: {err}") from None
    except OSError as err:
        if err.filename is not None:  # the root folder's
            raise
        raise HubError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port (0: any free "
                       f"one) or --host") from None
    if not token and not _loopback(host):
        typer.echo(f"warning: {host} is reachable from other machines and there is no --token: anyone who can reach "
                   f"port {server.url.rsplit(':', 1)[1]} can push to every repo and read the private ones; set "
                   f"LORA_HUB_TOKEN (or --token)", err=True)
    console.print(f"lora-hub serving {root} at {server.url}  (export HF_ENDPOINT={server.url})"
                  + ("; writes need the token" if token else ""))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: an address that other machines may reach
        return False


@contextlib.contextmanager
def _transfer(text: str) -> Iterator[None]:
    """A rich spinner on stderr while a transfer runs, instead of the client's per-file progress bars and its
    warnings (each retry of a failing download logs two lines; the failure itself is reported in one)."""
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    disable_progress_bars()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _status.status(Text(text)):  # a str would be read as markup whatever the console says
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def main() -> None:
    """The ``lora-hub`` entry point."""
    # Libraries imported on the way (transformers pulls in torchao when installed) log notices that are not
    # the user's business here: a merge's "newly initialized head" report, torchao's optional kernels.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.showwarning = _show_warning
    app(prog_name="lora-hub")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, like an error: not Python's two, the second the source line that warned."""
    typer.echo("warning: " + " ".join(str(message).split()), err=True)
