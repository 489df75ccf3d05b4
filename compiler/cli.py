"""The `cnnc` command."""
import click

@click.group()
def main() -> None:
    """cnnc"""
