"""The private APIs of dependencies that wsss_dist.compat adapts: fail loudly when a release changes them."""
import signal

import torch


def test_accelerate_shared_state_api():
    from accelerate.state import AcceleratorState

    from wsss_dist.compat import reset_accelerate_precision

    assert isinstance(AcceleratorState._shared_state, dict)
    assert callable(AcceleratorState._reset_state)
    reset_accelerate_precision("no")  # runs on an empty or a filled state


def test_submitit_signal_handler_api():
    from submitit.core import job_environment

    from wsss_dist.compat import submitit_requeue_handler

    from submitit.local.local import LocalJobEnvironment

    assert hasattr(job_environment, "SignalHandler")
    assert LocalJobEnvironment._usr_sig() in (signal.SIGUSR1, signal.SIGUSR2)
    assert submitit_requeue_handler(LocalJobEnvironment) is None  # no submitit handler bound in a test process


def test_dataloader_iterator_shutdown_api():
    from wsss_dist.compat import close_loader

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), batch_size=2, num_workers=1)
    it = iter(loader)
    next(it)
    assert callable(getattr(it, "_shutdown_workers", None))
    close_loader(it)
    assert it._shutdown


def test_submitit_sbatch_text_api(tmp_path):
    """launch.dry_run reads the sbatch script of a SLURM executor (private) and builds one where srun is absent."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    from wsss_dist.compat import sbatch_text

    assert callable(SlurmExecutor._make_submission_file_text) and callable(SlurmExecutor.affinity)

    def make():
        ex = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm")
        ex.update_parameters(name="x", timeout_min=10, slurm_partition="p", slurm_dependency="afterok:7")
        return ex

    text = sbatch_text(make)
    assert "#SBATCH --partition=p" in text and "#SBATCH --dependency=afterok:7" in text and "#SBATCH --time=10" in text
    assert not (tmp_path / "logs").exists()  # nothing written
