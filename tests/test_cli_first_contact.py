"""The `hidream` command on first contact: start-up failures, stop signals, key hints, help, typos, pipes.

Every test runs the real command in a subprocess (`python -m hidream.cli`); servers bind 127.0.0.1 on a
free port, run the demo checkpoint on the CPU and are always stopped by a fixture finalizer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "service"))
import server_util as su  # noqa: E402  (tests/service/server_util.py: real processes on loopback)
from server_util import procs  # noqa: E402, F401  (fixture)

pytestmark = pytest.mark.timeout(180)

FAST = ["--size", "64x64", "--steps", "2", "-q"]
HIDREAM_SCRIPT = Path(sys.executable).parent / "hidream"


# --- helpers ------------------------------------------------------------------------------------------------


def cli(args: list[str | Path], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return su.run_cli([str(a) for a in args], env, timeout=timeout)


def key_count(home: Path) -> int:
    """API keys in the home's SQLite database (0 when there is no database yet)."""
    path = home / "hidream.db"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM api_keys").fetchone()[0]


def task_status(home: Path, task_id: str) -> str:
    with sqlite3.connect(home / "hidream.db") as conn:
        return conn.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]


def png(path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def without_hidream_on_path(path: str) -> str:
    """PATH less every directory that holds a `hidream`."""
    return os.pathsep.join(d for d in path.split(os.pathsep) if d and not (Path(d) / "hidream").exists())


def stopping_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("stopping")]


def start_serve(processes: su.Processes, env: dict[str, str], *extra: str | Path, worker: bool = False) -> su.Proc:
    """`hidream serve` with extra flags, ready when this returns."""
    port = su.free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), *([] if worker else ["--no-worker"]), *map(str, extra)]
    proc = processes._start(args, env, port, "serve")
    proc.wait_ready(worker=worker)
    return proc


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[tuple[su.Proc, str]]:
    """One `serve --no-worker` for the tests that only submit: (process, first key)."""
    home = tmp_path_factory.mktemp("api-home")
    processes = su.Processes(home / "logs")
    try:
        server = processes.serve(su.service_env(home, demo_checkpoint), worker=False)
        key = server.first_key()
        assert key, server.output()
        yield server, key
    finally:
        processes.stop_all()


# --- 1. a model that cannot load stops `serve` and `worker` before anything is printed -----------------------------


def bad_model(tmp_path: Path, demo_checkpoint: Path, case: str) -> tuple[Path, list[str], str]:
    """(checkpoint, extra flags, how stderr starts)."""
    if case == "missing-dir":
        return tmp_path / "no-such-dir", [], "error: --model: "
    if case == "empty-dir":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", [], "error: --model: "
    if case == "broken-config":
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
        return tmp_path / "broken", [], "error: --model: "
    if case == "device-banana":
        return demo_checkpoint, ["--device", "banana"], "error: --device: "
    assert case == "device-cuda7"
    return demo_checkpoint, ["--device", "cuda:7"], "error: --device: cuda:7"


MODEL_CASES = ["missing-dir", "empty-dir", "broken-config", "device-banana", "device-cuda7"]
SAYS = {"missing-dir": "no such checkpoint directory", "empty-dir": "no config.json",
        "broken-config": "cannot be read as JSON", "device-banana": "banana", "device-cuda7": "cuda:7"}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_serve_refuses_a_model_it_cannot_load_before_any_banner_or_key(tmp_path: Path, home: Path,
                                                                      demo_checkpoint: Path, case: str) -> None:
    model, extra, starts = bad_model(tmp_path, demo_checkpoint, case)
    done = cli(["serve", "--host", "127.0.0.1", "--port", su.free_port(), *extra], su.service_env(home, model),
               timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith(starts) and SAYS[case] in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # no banner, no key
    assert key_count(home) == 0


def test_worker_refuses_a_model_it_cannot_load(tmp_path: Path, home: Path) -> None:
    done = cli(["worker"], su.service_env(home, tmp_path / "no-such-dir"), timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith(f"error: --model: {tmp_path / 'no-such-dir'}: no such checkpoint directory")
    assert "Traceback" not in done.stderr and done.stdout == ""


# --- 3. the port is checked first ----------------------------------------------------------------------------


def test_a_port_in_use_is_said_in_one_line_and_nothing_is_loaded(home: Path, demo_checkpoint: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli(["serve", "--host", "127.0.0.1", "--port", port], su.service_env(home, demo_checkpoint))
    assert done.returncode == 2
    assert done.stderr == f"error: --port: 127.0.0.1:{port} is already in use (another hidream serve?)\n"
    assert done.stdout == ""
    assert not (home / "hidream.db").exists()  # not even the database was opened


def test_an_address_of_another_machine_names_the_host(home: Path, demo_checkpoint: Path) -> None:
    done = cli(["serve", "--host", "203.0.113.9", "--port", su.free_port()], su.service_env(home, demo_checkpoint))
    assert done.returncode == 2
    assert done.stderr.startswith("error: --host: cannot listen on 203.0.113.9:"), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# --- 4, 5. the key hints are commands that run as written ------------------------------------------------------


def test_the_key_hints_run_as_written_in_a_fresh_shell(procs: su.Processes, home: Path, tmp_path: Path,
                                                       demo_checkpoint: Path) -> None:
    """With no `hidream` on PATH (as after scripts/demo) the hint names this environment's script."""
    env = su.service_env(home, demo_checkpoint)
    env["PATH"] = without_hidream_on_path(env.get("PATH", ""))
    runnable = str(HIDREAM_SCRIPT) if HIDREAM_SCRIPT.is_file() else f"{sys.executable} -m hidream.cli"
    expected = f"{runnable} keys create --name NAME --home {home}"

    first = start_serve(procs, env)
    assert first.first_key() and f"\nmore keys: {expected}\n" in first.output(), first.output()
    first.signal(signal.SIGTERM)
    assert first.wait_exit(40) == 0

    again = start_serve(procs, env)
    assert again.first_key() is None
    assert f"\nto make an API key: {expected}\n" in again.output(), again.output()

    fresh = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "user-home")}  # no HIDREAM_*, no virtualenv
    made = subprocess.run(["bash", "-c", expected.replace("NAME", "from-the-hint")], env=fresh,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("hd-")
    assert key_count(home) == 2


@pytest.mark.parametrize("which", ["this-installation", "another-hidream"])
def test_the_key_hint_says_hidream_only_when_that_is_this_installation(procs: su.Processes, home: Path,
                                                                      tmp_path: Path, demo_checkpoint: Path,
                                                                      which: str) -> None:
    env = su.service_env(home, demo_checkpoint)
    assert cli(["keys", "create", "--name", "existing"], env).returncode == 0
    if which == "this-installation":
        if not HIDREAM_SCRIPT.is_file():
            pytest.skip(f"no {HIDREAM_SCRIPT} (hidream.cli is not installed as a script here)")
        env["PATH"] = os.pathsep.join([str(HIDREAM_SCRIPT.parent), without_hidream_on_path(env["PATH"])])
        expected = f"hidream keys create --name NAME --home {home}"
    else:
        other = tmp_path / "other-bin"
        other.mkdir()
        (other / "hidream").write_text("#!/bin/sh\necho another hidream\n", encoding="utf-8")
        (other / "hidream").chmod(0o755)
        env["PATH"] = os.pathsep.join([str(other), without_hidream_on_path(env["PATH"])])
        runnable = str(HIDREAM_SCRIPT) if HIDREAM_SCRIPT.is_file() else f"{sys.executable} -m hidream.cli"
        expected = f"{runnable} keys create --name NAME --home {home}"
    server = start_serve(procs, env)
    assert f"\nto make an API key: {expected}\n" in server.output(), server.output()


# --- 8. SIGINT and SIGTERM: one line, status 0 ----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_prints_one_line_and_exits_0(procs: su.Processes, home: Path, demo_checkpoint: Path,
                                                   signum: int) -> None:
    server = procs.serve(su.service_env(home, demo_checkpoint))
    server.signal(signum)
    assert server.wait_exit(40) == 0, server.output()[-2000:]
    assert stopping_lines(server.output()) == ["stopping (no task was running)"], server.output()[-2000:]


def test_a_stop_in_the_middle_of_a_task_says_it_goes_back_to_the_queue(procs: su.Processes, home: Path,
                                                                      demo_checkpoint: Path) -> None:
    server = procs.serve(su.service_env(home, demo_checkpoint))
    with su.client(server.base_url, server.first_key()) as c:
        task = su.ok(c.post("/api/v1/model/generateImage", json={
            "model": "hidream-o1-image", "prompt": "a slow one", "image_size": "1024x1024",
            "num_inference_steps": 100}))
        su.poll(c, task["urls"]["get"], until=("processing",))
    server.signal(signal.SIGTERM)
    assert server.wait_exit(40) == 0, server.output()[-2000:]
    assert stopping_lines(server.output()) == [f"stopping: the running task {task['id']} goes back to the queue"]
    assert task_status(home, task["id"]) == "created"


def test_a_worker_stop_signal_prints_one_line_and_exits_0(procs: su.Processes, home: Path,
                                                          demo_checkpoint: Path) -> None:
    worker = procs.worker(su.service_env(home, demo_checkpoint))
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(40) == 0, worker.output()[-2000:]
    assert stopping_lines(worker.output()) == ["stopping (no task was running)"], worker.output()[-2000:]


# --- 9. every --ref counts ---------------------------------------------------------------------------------------


def test_generate_takes_repeated_and_listed_refs(tmp_path: Path, home: Path, demo_checkpoint: Path) -> None:
    refs = [png(tmp_path / f"ref{i}.png", color=(60 * i, 30, 30)) for i in range(3)]
    done = cli(["generate", "--model", demo_checkpoint, *FAST, "-o", tmp_path / "out.png",
                "--ref", refs[0], "--ref", refs[1], refs[2], "--", "three friends at the beach"],
               su.service_env(home, None))
    assert done.returncode == 0, done.stderr
    assert "personalization from 3 references" in done.stdout, done.stdout


@pytest.mark.parametrize("command", ["generate", "submit"])
def test_a_prompt_taken_by_ref_is_explained(tmp_path: Path, home: Path, command: str) -> None:
    ref = png(tmp_path / "a.png")
    done = cli([command, "--ref", ref, "a red fox in the snow"], su.service_env(home, None))
    assert done.returncode == 2
    assert done.stderr == ("error: prompt: missing; --ref took 'a red fox in the snow' for an image: put the "
                           f"prompt before the options, or end the --ref list with --\nsee: hidream {command} --help\n")


def test_submit_sends_every_ref(api: tuple[su.Proc, str], tmp_path: Path, home: Path) -> None:
    server, key = api
    refs = [png(tmp_path / f"ref{i}.png", color=(60 * i, 30, 30)) for i in range(3)]
    done = cli(["submit", "--api-key", key, "--base-url", server.base_url, "--no-wait",
                "--ref", refs[0], "--ref", refs[1], "--ref", refs[2], "--", "three friends"],
               su.service_env(home, None))
    assert done.returncode == 0, done.stderr
    with su.client(server.base_url, key) as c:
        pred = su.ok(c.get(f"/api/v1/model/prediction/{done.stdout.strip()}"))
    assert pred["input"]["mode"] == "personalization"
    assert len(pred["input"]["reference_image_urls"]) == 3


# --- 10. errors name the CLI's flag, not the engine's or the API's field -------------------------------------------

FLAG_CASES = [
    (["--steps", "0"], "error: --steps: must be an integer from 1 to 100 (got 0)"),
    (["--steps", "many"], "error: --steps: must be an integer (got 'many')"),
    (["--guidance", "0.5"], "error: --guidance: must be a number from 1.0 to 20.0"),
    (["--seed", "-2"], "error: --seed: must be an integer from 0 to 4294967295, or -1 for random (got -2)"),
    (["--num-images", "5"], "error: --num-images: must be an integer from 1 to 4 (got 5)"),
    (["--size", "10x10000"], "error: --size: must be one of square_hd"),
]


@pytest.mark.parametrize("command", ["generate", "submit"])
@pytest.mark.parametrize(("flags", "starts"), FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_rule_errors_name_the_flag(home: Path, command: str, flags: list[str], starts: str) -> None:
    """Checked before a model loads or anything is sent (no server listens for `submit` here)."""
    done = cli([command, "a cat", *flags], su.service_env(home, None) | {"HIDREAM_BASE_URL": "http://127.0.0.1:9"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(starts), done.stderr
    assert "Traceback" not in done.stderr


def test_an_engine_error_on_a_reference_names_the_ref(tmp_path: Path, home: Path, demo_checkpoint: Path) -> None:
    ok, thin = png(tmp_path / "ok.png"), png(tmp_path / "thin.png", size=(1000, 1))
    done = cli(["generate", "a cat", "--model", demo_checkpoint, *FAST, "-o", tmp_path / "out.png",
                "--ref", ok, thin], su.service_env(home, None))
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: --ref[1]: {thin}: a 1000x1 image is too small or thin"), done.stderr


@pytest.mark.parametrize(("flags", "starts"), [
    (["--model", "nope"], "error: --model: must be one of hidream-o1-image"),
    (["--ref", "http://127.0.0.1:9/x.png"], "error: --ref[0]: http://127.0.0.1:9/x.png resolves to 127.0.0.1"),
    (["--webhook-url", "http://127.0.0.1:9/hook"], "error: --webhook-url: http://127.0.0.1:9/hook resolves to"),
])
def test_the_apis_errors_name_the_flag(api: tuple[su.Proc, str], home: Path, flags: list[str], starts: str) -> None:
    server, key = api
    done = cli(["submit", "a cat", "--api-key", key, "--base-url", server.base_url, "--no-wait", *flags],
               su.service_env(home, None))
    assert done.returncode == 2
    assert done.stderr.startswith(starts), done.stderr


def test_an_unreadable_local_ref_is_named_before_anything_is_sent(tmp_path: Path, home: Path) -> None:
    done = cli(["submit", "a cat", "--api-key", "hd-x", "--base-url", "http://127.0.0.1:9", "--ref",
                png(tmp_path / "a.png"), tmp_path / "missing.png"], su.service_env(home, None))
    assert done.returncode == 2
    assert done.stderr == f"error: --ref[1]: cannot read {tmp_path / 'missing.png'}: no such file\n"


# --- 11. help: meanings and defaults, each command its own settings, no secret on the command line ----------------


def help_of(command: str, home: Path) -> str:
    done = cli([command, "--help"], su.service_env(home, None) | {"COLUMNS": "1000"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))


def test_every_setting_flag_says_what_it_is_and_its_default(home: Path) -> None:
    text = help_of("serve", home)
    assert re.search(r"--port PORT\s+TCP port the API listens on \(default: 8000; env HIDREAM_PORT\)", text), text
    entries: list[str] = []  # one per flag: its line and the help's lines under it, joined
    for line in text.split("settings (")[1].splitlines()[1:]:
        if line.lstrip().startswith("--"):
            entries.append(line.strip())
        elif entries and line.strip():
            entries[-1] += " " + line.strip()
    assert len(entries) >= 35, entries
    for entry in entries:
        if entry.startswith("--no-worker"):
            continue
        # `--flag VALUE  meaning`, or a switch (`--compile  meaning`)
        meaning = re.fullmatch(r"--[a-z0-9-]+(?: [A-Z0-9_]+)?\s+(.+) \(default: .+; (or the value itself in )?env "
                               r"HIDREAM_\w+\)", entry)
        assert meaning and len(meaning.group(1)) > 10, entry


@pytest.mark.parametrize(("command", "has", "lacks"), [
    ("keys", {"--home", "--database-url", "--rate-per-minute", "--max-concurrent", "--name", "--rate"},
     {"--port", "--host", "--model", "--max-queue", "--secret-file", "--lease-s", "--quantize", "--offload",
      "--tokenizer"}),
    ("status", {"--home", "--database-url", "--lease-s", "--json"},
     {"--port", "--model", "--rate-per-minute", "--storage-url", "--secret-file", "--quantize", "--offload",
      "--tokenizer"}),
    ("worker", {"--home", "--database-url", "--model", "--device", "--dtype", "--variant", "--model-ids",
                "--precision", "--compile", "--quantize", "--offload", "--tokenizer",
                "--storage-dir", "--storage-url", "--s3-endpoint-url", "--s3-secret-access-key-file", "--url-ttl-s",
                "--price-usd", "--lease-s", "--max-attempts", "--preview-every", "--preview-size"},
     {"--host", "--port", "--public-url", "--max-queue", "--secret-file", "--rate-per-minute", "--model-aliases",
      "--webhook-timeout-s", "--max-body-bytes", "--no-worker"}),
    ("serve", {"--host", "--port", "--public-url", "--secret-file", "--s3-secret-access-key-file", "--no-worker",
               "--model-aliases", "--webhook-give-up-s", "--max-queue", "--quantize", "--offload", "--tokenizer"},
     {"--secret", "--s3-secret-access-key"}),
])
def test_each_command_takes_only_the_settings_it_reads(home: Path, command: str, has: set[str],
                                                       lacks: set[str]) -> None:
    shown = flags_in(help_of(command, home))
    assert has <= shown, has - shown
    assert not lacks & shown, lacks & shown


def test_a_setting_of_another_command_says_which_takes_it(home: Path) -> None:
    done = cli(["keys", "list", "--port", "8001"], su.service_env(home, None))
    assert done.returncode == 2
    assert done.stderr == "error: unknown option --port (keys does not read it; serve does)\nsee: hidream keys --help\n"


def test_keys_help_lists_every_action(home: Path) -> None:
    text = help_of("keys", home)
    for action in ("create ", "list ", "revoke KEY ", "limits KEY "):
        assert re.search(rf"^  {action}\s+\w", text, re.M), (action, text)


@pytest.mark.parametrize(("args", "says"), [
    (["serve", "--secret", "s3cr3t"], "error: --secret: removed: a value on the command line shows in ps; set "
                                      "HIDREAM_SECRET or pass --secret-file PATH"),
    (["worker", "--s3-secret-access-key", "s3cr3t"], "error: --s3-secret-access-key: removed: a value on the command "
     "line shows in ps; set HIDREAM_S3_SECRET_ACCESS_KEY or pass --s3-secret-access-key-file PATH"),
    (["serve", "--secret-file", "/no/such/file"], "error: --secret-file: cannot read /no/such/file (No such file or "
                                                  "directory)"),
])
def test_secrets_are_not_flag_values(home: Path, args: list[str], says: str) -> None:
    done = cli(args, su.service_env(home, None))
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == says, done.stderr
    assert "s3cr3t" not in done.stderr


def test_the_secret_file_signs(procs: su.Processes, home: Path, tmp_path: Path, demo_checkpoint: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cr3t-from-a-file\n", encoding="utf-8")
    server = start_serve(procs, su.service_env(home, demo_checkpoint), "--secret-file", secret_file)
    key = server.first_key()
    key_id = cli(["keys", "list"], server.env).stdout.split()[0]
    with su.client(server.base_url, key) as c:
        got = su.ok(c.get("/api/v1/webhook/secret"))["secret"]
    expected = hmac.new(b"s3cr3t-from-a-file", f"webhook:{key_id}".encode(), hashlib.sha256).hexdigest()
    assert got == "whsec_" + expected


def test_version(home: Path) -> None:
    done = cli(["--version"], su.service_env(home, None))
    assert (done.returncode, done.stdout) == (0, f"hidream {version('hidream')}\n")


# --- 12. a typo: one line, and where to look ---------------------------------------------------------------------


@pytest.mark.parametrize(("args", "says", "prog"), [
    (["serve", "--prot", "9000"], "error: unknown option --prot (did you mean --port?)", "hidream serve"),
    (["keys", "creat"], "error: keys: unknown action 'creat' (did you mean create?)", "hidream keys"),
    (["keys"], "error: keys: missing action (one of create, list, revoke, limits)", "hidream keys"),
    (["serv"], "error: unknown command 'serv' (did you mean serve?)", "hidream"),
    (["generate", "a cat", "--stesp", "3"], "error: unknown option --stesp (did you mean --steps?)",
     "hidream generate"),
    (["status", "--jsn"], "error: unknown option --jsn (did you mean --json?)", "hidream status"),
    (["worker", "--lease-s", "soon"], "error: --lease-s: must be a number (got 'soon')", "hidream worker"),
    (["worker", "--quantize", "fp4"], "error: --quantize: must be one of none, fp8 (got 'fp4'; did you mean fp8?)",
     "hidream worker"),
    (["generate", "a cat", "--offload", "cpu"], "error: --offload: must be one of none, layers, auto (got 'cpu')",
     "hidream generate"),
    (["convert", "a", "b.safetensors", "--drop", "vision"],
     "error: --drop: must be a comma list of lm_head, deepstack (got 'vision')", "hidream convert"),
    (["convert", "a"], "error: convert: missing DST", "hidream convert"),
    (["submit", "a cat", "--format", "gif"], "error: --format: must be one of png, jpeg, webp (got 'gif')",
     "hidream submit"),
    (["generate", "--ref", "a.png", "--", "a cat", "-o", "x.png"],
     "error: -o: after --, options are arguments; put -o before the --", "hidream generate"),
])
def test_a_mistake_prints_one_line_and_where_to_look(home: Path, args: list[str], says: str, prog: str) -> None:
    done = cli(args, su.service_env(home, None))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"{says}\nsee: {prog} --help\n"


# --- 13. a reader that goes away ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["status", "--json"], ["keys", "list"], ["--help"]])
def test_a_closed_stdout_ends_quietly(home: Path, args: list[str]) -> None:
    env = su.service_env(home, None)
    assert cli(["keys", "create", "--name", "listed"], env).returncode == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: `| head -0`
    try:
        done = subprocess.run([sys.executable, "-m", "hidream.cli", *args], env=env, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        os.close(write)
    assert done.stderr == ""
    # 141 as a writer killed by SIGPIPE; argparse itself ignores a failed write of the help, so 0 there
    assert done.returncode == (0 if args == ["--help"] else 141)


# --- 14. a key by any unambiguous start of its id or prefix ----------------------------------------------------


def shortest_unique_start(text: str, others: list[str], at_least: int = 4) -> str:
    for n in range(at_least, len(text) + 1):
        if not any(o.startswith(text[:n]) for o in others):
            return text[:n]
    raise AssertionError(f"{text} is not unique among {others}")


def test_keys_by_any_unambiguous_start(home: Path) -> None:
    env = su.service_env(home, None)
    tokens = []
    for name in ("alpha", "beta", "gamma"):
        made = cli(["keys", "create", "--name", name], env)
        assert made.returncode == 0, made.stderr
        tokens.append(made.stdout.split()[0])
    rows = [line.split() for line in cli(["keys", "list"], env).stdout.splitlines()]
    ids, prefixes = [r[0] for r in rows], [r[1].removesuffix("…") for r in rows]
    assert all(t.startswith(p) for t, p in zip(tokens, prefixes, strict=True))

    every = cli(["keys", "limits", "hd-"], env)
    assert every.returncode == 2
    assert every.stderr.startswith("error: key: 'hd-' matches 3 keys: ") and all(i in every.stderr for i in ids)
    assert every.stderr.rstrip().endswith("give more characters"), every.stderr

    short = shortest_unique_start(tokens[0], tokens[1:])
    done = cli(["keys", "limits", short, "--rate", "5"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(ids[0]) and "rate: 5 submits/min" in done.stdout

    shown = cli(["keys", "limits", f"{prefixes[1]}…"], env)  # pasted from `keys list`, with the …
    assert shown.returncode == 0 and shown.stdout.startswith(ids[1]), shown.stderr

    by_id = shortest_unique_start(ids[1], [ids[0], ids[2]])
    revoked = cli(["keys", "revoke", by_id], env)
    assert revoked.returncode == 0 and revoked.stdout.startswith(f"revoked {ids[1]}"), revoked.stderr
    again = cli(["keys", "revoke", by_id], env)
    assert again.returncode == 2 and "no active key" in again.stderr and ids[1] in again.stderr

    whole = cli(["keys", "revoke", tokens[2]], env)
    assert whole.returncode == 0 and whole.stdout.startswith(f"revoked {ids[2]}"), whole.stderr
    assert tokens[2] not in whole.stdout

    none = cli(["keys", "limits", "nope"], env)
    assert none.returncode == 2 and "no key with id or prefix 'nope'" in none.stderr
    listed = cli(["keys", "list"], env).stdout
    assert listed.count("revoked") == 2 and "rate: 5 submits/min" in listed
