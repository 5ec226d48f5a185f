"""Command line entry point `inlaid-ray`."""


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("not wired yet")
