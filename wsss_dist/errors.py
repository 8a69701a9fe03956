"""Errors a user can cause and fix: the CLI prints them as one line, without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's inputs (config, files, weights); the message says what and where."""


class ConfigError(UserError, ValueError):
    """An unknown config key or a bad value."""


class DataError(UserError):
    """Missing or malformed data files (lists, images, masks, shards, manifests)."""


class DamagedFile(DataError, ValueError):
    """A file the package wrote or reads (JSON record, DONE, model.json, manifest, npz, list) that is not what it
    must be: not UTF-8, not valid JSON or npz, or of the wrong structure. The message names it and what to do."""


class WeightsError(UserError):
    """A weights file that is missing or does not fit the model."""


class StageNotDone(UserError, FileNotFoundError):
    """A stage needs the output of an earlier stage of the run that has not finished (no DONE marker)."""


class TrainingDiverged(UserError):
    """The loss became NaN or inf."""


class StageLocked(UserError):
    """Another live process runs this stage of this run (it holds ``runs/<run>/<stage>/LOCK``)."""


class RunConfigChanged(UserError):
    """A finished (or begun) stage of the run used other values of the keys that shape it; or the shards folder
    holds other data's shards."""


class Interrupted(Exception):
    """A stop signal (SIGUSR1/SIGUSR2/SIGTERM/SIGINT) arrived; the engine wrote a checkpoint. Rerun to resume."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        super().__init__(message or f"stopped by signal {signum} after writing a checkpoint")
        self.signum = signum


class LauncherTerminated(KeyboardInterrupt):
    """SIGTERM to the launcher (a ``kill``, a container stop): it stops its local jobs as Ctrl-C does."""
