"""Run-config assembly: `RunConfigBuilder` turns a job record and the service's
configuration (model catalog, run defaults, limits) into the RunConfig its driver runs.
"""

from __future__ import annotations

import os

from raybatch.adapters import adapter_files_missing, routing_for
from raybatch.config import ModelEntry, RunConfig, ServiceConfig
from raybatch.exceptions import ConfigError
from raybatch.jobs.model_names import hub_id, resolve_model
from raybatch.resources import DATASETS, JobRecord, parse_reference
from raybatch.store import Store


class RunConfigBuilder:
    def __init__(self, config: ServiceConfig, store: Store, pool_name: str):
        self._config = config
        self._store = store
        self._pool_name = pool_name

    def for_job(self, record: JobRecord) -> RunConfig:
        job = record.job
        return self.for_model(
            job.model,
            input=self.input_url(job.input_dataset_id),
            output=self.files_url(job.output_dataset_id),
            inference_parameters=job.inference_parameters,
            precision=job.precision,
            skip_succeeded_in=record.runtime.skip_succeeded_in,
            account=record.runtime.account,
            job_id=job.name.rsplit("/", 1)[-1],
        )

    def for_model(self, name: str, **job_fields) -> RunConfig:
        """The catalog model `name` under the run defaults, with `job_fields` on top."""
        model = self._model(name)
        resolved = resolve_model(self._config, name)
        routing = routing_for(self._config, resolved, name) if resolved is not None else None
        fields = dict(self._config.run_defaults)
        defaults = fields.get("engine", {})
        engine = {**defaults, **model.engine}
        engine["engine_args"] = {**defaults.get("engine_args", {}), **model.engine.get("engine_args", {})}
        fields.update(
            **job_fields,
            model=model.source,
            # A job on an adapter serves under its base's name: rows of the base model
            # show that, its adapter's rows the adapter's (EngineResult.adapter).
            served_model_name=resolved if routing is not None and routing.default else name,
            lora=routing,
            engine=engine,
            engine_pool=self._pool_name,
            # The dataset limit again while reading: a shard that expands past it (a
            # gzip bomb, a file changed after validation) stops the job, not the node.
            max_shard_bytes=self._config.max_dataset_bytes,
        )
        try:
            return RunConfig.model_validate(fields)
        except ValueError as error:
            raise ConfigError(f"invalid job settings: {error}") from None

    def files_url(self, dataset_name: str) -> str:
        """Where a dataset's files are, from its resource name."""
        account, dataset_id = parse_reference(dataset_name, DATASETS, "")
        return self._store.dataset_files_url(account, dataset_id)

    def input_url(self, dataset_name: str) -> str:
        """Where a job reads a dataset: its externalUrl, in place, or its files."""
        account, dataset_id = parse_reference(dataset_name, DATASETS, "")
        dataset = self._store.get_dataset(account, dataset_id)
        return dataset.external_url if dataset is not None and dataset.external_url else self.files_url(dataset_name)

    def _model(self, name: str) -> ModelEntry:
        """The catalog entry `name` resolves to (a catalog name, an alias or a Fireworks
        name); with allow_any_model, else the name itself (a Fireworks name as its
        Hugging Face ID)."""
        resolved = resolve_model(self._config, name)
        if resolved is not None:
            return self._config.models[resolved]
        if not self._config.allow_any_model:  # a job created before the catalog changed
            raise ConfigError(f"model {name!r} is not in the service's model catalog")
        return ModelEntry(source=hub_id(name) or name)


def check_model_source(source: str) -> None:
    """A local model must exist; a hub ID is left for the engine to fetch."""
    looks_local = source.startswith(("/", ".", "~", "file://")) or os.path.exists(source)
    if looks_local and not os.path.isfile(os.path.join(os.path.expanduser(source), "config.json")):
        raise ConfigError(f"model {source!r}: no config.json there")


def check_adapter_source(config: RunConfig) -> None:
    """The job's own adapter, when its model is one, must exist like a model must.
    Other adapters are checked as rows name them: a broken one fails those rows, not
    the jobs that never use it (raybatch/engines/lora.py)."""
    lora = config.lora
    if lora is None or lora.default is None:
        return
    source = lora.adapters[lora.default]
    if adapter_files_missing(source):
        raise ConfigError(f"LoRA adapter {lora.default!r} ({source!r}): no adapter_config.json there")
