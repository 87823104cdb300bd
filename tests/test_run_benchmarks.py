"""run_benchmarks.py's plan: every step names a script that exists and flags that script accepts, on both
devices, so the one prepared call on a lent GPU cannot fail on a typo."""

import importlib.util
import subprocess

import pytest
from conftest import ROOT, load_project

spec = importlib.util.spec_from_file_location("run_benchmarks", ROOT / "run_benchmarks.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
STEPS = [(job.project, device, script, args) for job in runner.plan() for device, steps in job.steps.items()
         for script, args in steps]  # fmt: skip


@pytest.mark.parametrize("project,device,script,args", STEPS, ids=[f"{s[0]}-{s[1]}-{s[2]}" for s in STEPS])
def test_every_step_parses_with_its_script(project, device, script, args, tmp_path):
    if "/" in script:
        project, script = script.split("/")
    module = getattr(load_project(project), script.removesuffix(".py"))
    extra = [] if "--device" in args else ["--device", device]
    extra += ["--out", str(tmp_path)] if script == "benchmark.py" else []
    module.parse_args([*args, *extra])  # argparse exits (code 2) on a flag the script does not know


def test_every_project_is_in_the_plan_and_the_budget_is_shared_out():
    planned = [job.project for job in runner.plan()]
    assert sorted(planned) == sorted(p.name for p in runner.ROOT.glob("phase*/project*"))
    assert all(set(job.steps) == set(job.seconds) == {"cuda", "cpu"} for job in runner.plan())


def test_list_prints_the_plan_without_running_anything(capsys):
    assert runner.main(["--list", "--device", "cuda", "--budget", "480"]) == 0
    out = capsys.readouterr().out
    assert out.index("project03_pretrain") < out.index("project01_minimal_gpt")  # priority order
    assert runner.main(["--only", "project99_nothing", "--list"]) == 2
    assert runner.main(["--only", "project09_flash_attention,project08_kv_cache", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.index("project09") < out.index("project08")  # --only's order is the priority


def test_a_checkpoint_two_jobs_read_is_trained_once_and_a_cut_short_job_is_no_failure(
    tmp_path, monkeypatch, capsys
):
    """Projects 14 and 16 read the same character model: the first job trains it, the second reuses it. A
    benchmark stopped by the budget (exit 130) wrote what it measured: the run does not count it as failed."""
    calls = []

    def fake_run(folder, script, args, limit):
        calls.append((folder.name, script))
        return 130 if folder.name == "project16_qat" and script == "benchmark.py" else 0

    monkeypatch.setattr(runner, "_run", fake_run)
    monkeypatch.setattr(runner, "TEXT", tmp_path)  # the data checks pass: any path that exists
    monkeypatch.setattr(runner, "SHARDS", tmp_path)
    flags = ["--device", "cpu", "--only", "project16_qat,project14_ptq", "--out", str(tmp_path / "results")]
    assert runner.main(flags) == 0
    assert calls == [("project16_qat", "project01_minimal_gpt/train.py"), ("project16_qat", "benchmark.py"),
                     ("project14_ptq", "benchmark.py")]  # fmt: skip
    out = capsys.readouterr().out
    assert (
        "project16_qat: exit codes [0, 'cut short']" in out
        and "project14_ptq: exit codes ['reused', 0]" in out
    )


def test_a_training_step_is_reused_only_when_it_is_the_same_command(tmp_path, monkeypatch):
    """The same --out trained with another preset is another model: the second job trains it again."""
    calls, plan = [], runner.plan

    def plan_with_another_preset():
        jobs = plan()
        p14 = next(j for j in jobs if j.project == "project14_ptq")
        script, args = p14.steps["cpu"][0]
        p14.steps["cpu"][0] = (script, [("cpu" if a == "tiny" else a) for a in args])
        return jobs

    monkeypatch.setattr(runner, "plan", plan_with_another_preset)
    monkeypatch.setattr(runner, "_run", lambda folder, script, args, limit: calls.append(script) or 0)
    monkeypatch.setattr(runner, "TEXT", tmp_path)
    monkeypatch.setattr(runner, "SHARDS", tmp_path)
    flags = ["--device", "cpu", "--only", "project16_qat,project14_ptq", "--out", str(tmp_path / "results")]
    assert runner.main(flags) == 0
    assert calls.count("project01_minimal_gpt/train.py") == 2


def test_mistakes_are_refused_before_anything_runs(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert runner.main(["--device", "cpu", "--out", str(afile / "results")]) == 2
    assert "cannot write" in capsys.readouterr().err and afile.read_text() == "keep me"
    if not runner._has_cuda():
        assert runner.main(["--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_checkpoint_a_step_reads_an_earlier_step_wrote(device):
    """On a fresh machine no checkpoint is under data/models/benchmarks/ unless the plan made it."""
    written = set()
    for job in runner.plan():
        for _, args in job.steps[device]:
            for flag in ("--checkpoint", "--init-from"):
                if flag in args and args[args.index(flag) + 1].startswith(str(runner.MODELS)):
                    assert args[args.index(flag) + 1] in written, f"{job.project}: {flag} read before written"
            if "--out" in args:
                written.add(args[args.index("--out") + 1])


@pytest.mark.parametrize("budget", ["nan", "0", "-60", "inf"])
def test_the_budget_is_a_positive_number_of_seconds(budget, capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--budget", budget, "--list"])
    assert e.value.code == 2 and "--budget" in capsys.readouterr().err


def test_only_names_at_least_one_project(capsys):
    assert runner.main(["--only", "", "--list"]) == 2
    assert runner.main(["--only", " , ", "--list"]) == 2
    assert "--only" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("budget", [30, 60, 200, 480, 10_000])
def test_a_small_budget_leaves_out_the_least_important_not_the_most(device, budget):
    jobs = runner.plan()
    shares = runner.allocate(jobs, budget, device)
    chosen = [j for j in jobs if j.project in shares]
    assert chosen == jobs[: len(chosen)] and chosen[0] == jobs[0]  # a prefix of the priority order
    assert sum(shares.values()) <= budget + 1e-6 or len(chosen) == 1
    for job in chosen:  # each gets at least half its share (and enough to be worth starting), never more
        assert shares[job.project] <= job.seconds[device]
        if len(chosen) > 1:
            floor = max(0.5 * job.seconds[device], min(job.seconds[device], runner.MIN_SECONDS))
            assert shares[job.project] >= floor
    if budget >= sum(j.seconds[device] for j in jobs):
        assert len(chosen) == len(jobs)


def test_list_prints_commands_that_run_from_the_repository_root(capsys):
    assert runner.main(["--list", "--device", "cpu"]) == 0
    scripts = [
        line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("    python")
    ]
    assert scripts and all((ROOT / s).is_file() for s in scripts)


def test_prepare_offline_names_the_file_and_takes_local_copies(tmp_path, monkeypatch, capsys):
    """Offline (the projects' downloads fail), --prepare stops with one line saying which file goes where;
    with --from DIR holding the copies it puts each in place, and the projects then find them (no download:
    the subprocess is faked here, as tests never touch the network)."""
    dests = {
        what: (tmp_path / "data" / d.name, names, p, c) for what, (d, names, p, c) in runner.DOWNLOADS.items()
    }
    monkeypatch.setattr(runner, "DOWNLOADS", dests)
    monkeypatch.setattr(runner, "SHARDS", tmp_path / "data" / "shards")
    (tmp_path / "data" / "shards").mkdir(parents=True)
    (tmp_path / "data" / "shards" / "x_val_000000.bin").write_bytes(b"")  # shards made earlier
    monkeypatch.setattr(runner, "DATA", tmp_path / "data")

    def fake_download(cmd, cwd, **kwargs):
        found = next(d for d, _, _, call in dests.values() if call in cmd[-1]).exists()  # then no download
        error = (
            "cli.UserError: could not download https://x/input.txt (offline); when offline, pass --data FILE"
        )
        return subprocess.CompletedProcess(
            cmd, 0 if found else 1, "", "" if found else f"Traceback\n{error}\n"
        )

    monkeypatch.setattr(runner.subprocess, "run", fake_download)
    assert runner.main(["--prepare"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Tiny Shakespeare" in err and "--from DIR" in err and "--data" not in err
    assert f"{tmp_path.name}/data/input.txt" in err  # where the copy goes
    local = tmp_path / "copies"
    local.mkdir()
    for _, names, _, _ in dests.values():
        (local / names[-1]).write_text("a copy")
    assert runner.main(["--prepare", "--from", str(local)]) == 0
    assert all(d.read_text() == "a copy" for d, *_ in dests.values())
