"""Every gate the project has, in one place: ``nox -l`` lists them.

Dependencies come from ``[dependency-groups]`` in pyproject.toml, so CI, a developer and
this file agree on what is installed.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _install(session: nox.Session, *groups: str) -> None:
    session.install("-e", ".")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite (arguments after ``--`` go to pytest)."""
    _install(session, "test")
    session.run("python", "-m", "OpenSSL.debug")
    session.run("python", "-bb", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, mypy --strict over src, tests, bench, demo, this file."""
    _install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "src", "tests", "bench", "demo", "noxfile.py")


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """The whole lending story on this machine, narrated; ``-- --help`` lists its options."""
    _install(session, "demo")
    session.run("python", "demo/run.py", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks with their baselines side by side; ``nox -s bench -- wire`` runs one."""
    _install(session, "bench")
    names = session.posargs or sorted(path.stem for path in Path("bench").glob("[!_]*.py"))
    for name in names:
        session.run("python", f"bench/{name}.py")


@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """Fuzz every decoder of untrusted bytes; ``-- 100000 [HARNESS...]``: inputs each.

    Prints the inputs run and the findings of each harness (tests/fuzz/run.py).
    """
    _install(session, "fuzz")
    session.run("python", "-m", "tests.fuzz.run", *session.posargs)


@nox.session(default=False)
def chaos(session: nox.Session) -> None:
    """The full fault campaign (src/drm_lab/chaos.py): ``-- --seed N --faults N
    --borrowers N --enclaves N``.

    By default 500 faults or more against 2 borrowers with 3 enclaves each; prints the
    faults by kind and every violation, and fails on one.
    """
    _install(session, "test")
    args = session.posargs or [
        "--seed",
        "1",
        "--faults",
        "500",
        "--borrowers",
        "2",
        "--enclaves",
        "3",
    ]
    workdir = Path(session.create_tmp()).resolve() / "chaos"
    session.run("rm", "-rf", str(workdir), external=True)
    session.run("python", "-m", "drm_lab.chaos", "--workdir", str(workdir), *args)
