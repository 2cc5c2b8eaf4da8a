"""`r3rl --help` and building the parser import no heavy module: torch, transformers, matplotlib, fastapi and wandb
load only in the subcommands that use them (a fresh interpreter each, so nothing is imported already)."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "matplotlib", "fastapi", "wandb")


def _imported(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return eval(proc.stdout.strip().splitlines()[-1])


def test_building_the_parser_and_the_help_import_nothing_heavy():
    code = ("import contextlib, io, r3rl.cli\np = r3rl.cli.build_parser()\np.format_help()\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    r3rl.cli.main(['--help'])\n"
            "p.parse_args(['plot', 'runs/x'])")
    assert _imported(code) == []


def test_the_probe_sees_an_import():  # the negative control: a subcommand that needs torch does import it
    assert _imported("import r3rl.cli\nr3rl.cli.build_parser().parse_args(['train', '--preset', 'tiny-olmoe'])") \
        == ["torch", "transformers"]


def test_the_parsers_literal_defaults_agree_with_their_modules():
    import r3rl.cli
    from r3rl.tasks.reward_pool import DEFAULT_REWARD_TIMEOUT_S
    from r3rl.tasks.rewards import BUILTIN_REWARDS

    assert r3rl.cli.REWARD_TIMEOUT_S == DEFAULT_REWARD_TIMEOUT_S
    assert list(r3rl.cli.REWARD_CHOICES) == sorted(BUILTIN_REWARDS) and "math" in r3rl.cli.REWARD_CHOICES
