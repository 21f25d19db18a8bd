"""Entry points: the `dlpipe` CLI and one thin recipe per stage."""
