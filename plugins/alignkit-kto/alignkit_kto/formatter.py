"""KTO's data: the core's unpaired-preference rows, with the checks KTO's own settings need."""

from alignkit import ConfigError
from alignkit.formatters import UnpairedPreferenceFormatter


class KTOFormatter(UnpairedPreferenceFormatter):
    """The core's "unpaired-preference" formatter (paired rows unpaired, KL pairs fixed at preprocessing)."""

    def check_data(self, dataset, source: str, pm=None, run=None) -> None:
        """With method.kl_pairing=batch each row's KL completion is the previous row's of its micro-batch: a
        micro-batch of one row pairs it with its own completion, and the KL estimate measures nothing."""
        config = self.config
        if run is None or getattr(config, "kl_pairing", "fixed") != "batch" or not getattr(config, "uses_kl", True):
            return
        size = run.train.per_device_train_batch_size
        if size < 2:
            raise ConfigError(f"method.kl_pairing=batch pairs each row with another row of its micro-batch, and "
                              f"train.per_device_train_batch_size={size} leaves none (the KL term would be 0); set "
                              "train.per_device_train_batch_size to 2 or more, or method.kl_pairing=fixed")
