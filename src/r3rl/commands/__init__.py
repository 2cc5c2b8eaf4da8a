"""One module per `r3rl` subcommand (cli.py maps the flags onto each one's config): check, train, plot, verify-logs."""
