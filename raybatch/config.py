"""Run settings: one pydantic model per concern, `extra="forbid"` so a typo is an error."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raybatch.adapters import AdapterRouting
from raybatch.protocol import (
    DEFAULT_IMAGE_FETCH_TIMEOUT_SECONDS,
    DEFAULT_IMAGE_URL_SCHEMES,
    DEFAULT_MAX_CUSTOM_ID_BYTES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGES_PER_ROW,
    DEFAULT_MAX_JSON_SCHEMA_BYTES,
    DEFAULT_MAX_N,
    DEFAULT_MAX_OUTPUT_TOKENS,
    DEFAULT_MAX_TOP_LOGPROBS,
    InferenceParameters,
    Precision,
)

GIB = 1 << 30
MIB = 1 << 20


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: Optional[int] = Field(
        None,
        ge=1,
        description="A fixed number of engine replicas (sets min_replicas and max_replicas "
        "both). None: `raybatch run` uses one per `tensor_parallel_size` x "
        "`pipeline_parallel_size` GPUs of the cluster (one without GPUs); the service "
        "scales between min_replicas and max_replicas.",
    )
    min_replicas: int = Field(
        0, ge=0, description="Replicas the service keeps warm even with nothing queued. "
        "Above 0 a job starts without waiting for an engine, at the price of the replicas' "
        "GPUs and memory held while idle."
    )
    max_replicas: Optional[int] = Field(
        None, ge=1, description="Most replicas of this model at once. None: as many as the "
        "GPUs fit (one on a cluster without GPUs). Lower it to leave GPUs to other models."
    )
    idle_seconds: float = Field(
        300, gt=0, description="A replica with nothing in flight and nothing queued for this "
        "long is stopped (never below min_replicas). Shorter frees GPUs sooner; longer spares "
        "the next job an engine start (tens of seconds to minutes)."
    )
    admission_factor: float = Field(
        1.25, ge=1, le=4, description="Requests each replica holds in flight, as a multiple "
        "of max_num_seqs. Above 1, a finished sequence is replaced at once from the ones "
        "waiting inside the engine; higher holds more requests (and their memory) in the "
        "engine and makes fair sharing between jobs coarser."
    )
    prefix_affinity: bool = Field(
        True, description="With several replicas of the model, a row goes to the replica "
        "its prompt's start (first 512 characters) last went to, while that replica is "
        "within a quarter of the admission window of the least busy one: that replica's "
        "prefix cache already holds the shared prompt (a few-shot prefix, a long system "
        "prompt), so it is computed once per replica instead of once per replica per "
        "wave. Off: always the least busy replica."
    )
    lead_batch_seconds: float = Field(
        5, ge=0, description="A job's first batch of rows goes to the engine ahead of the "
        "rest, which wait until it is answered, at most this long, when a replica was idle "
        "for it (running nothing, or only other jobs' first batches; on a busy one nothing "
        "is held). On the idle replica its "
        "rows then decode in a small, fast batch, and the job's first results are visible "
        "within seconds instead of after a whole wave of its rows (hundreds decoding in "
        "lockstep). Costs the job at most this long of a fuller engine at its start. 0: off."
    )
    max_start_failures: int = Field(
        3, ge=1, description="Engine starts that may fail in a row before the jobs waiting "
        "for this model fail with the engine's error."
    )
    start_timeout_seconds: float = Field(
        600, gt=0, description="A replica not ready this long after the pool asked Ray for "
        "it is a start that hung: it is killed and counts as a failed start (see "
        "max_start_failures). Counts all a start takes: waiting for its resources, "
        "loading (or downloading) the weights, torch.compile, CUDA graph capture. The "
        "default covers many times over a cold start with torch.compile of the tests' "
        "tiny model on a 2-core CPU machine (about 70 s), and a small model's on a GPU. "
        "Raise it for large GPU models (hundreds of GB of weights, or a download from "
        "the Hub: an hour is not unusual). Lower frees a hung start's rows sooner."
    )
    replica_cpus: float = Field(
        1, ge=0, description="CPUs reserved for each replica's engine loop (scheduling, "
        "detokenizing), so the pipelines' tasks cannot starve it. The scripted test "
        "engine reserves none. On a small CPU-only machine every replica's CPU is one "
        "fewer for the pipelines: start Ray with enough logical CPUs."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica needs, e.g. "
        "{\"engine-pool-a\": 1} to keep replicas on the nodes that advertise it."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs per replica, all on one node. Raise it for models that "
        "do not fit one GPU; it costs inter-GPU traffic per token."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Pipeline stages per replica, each of tensor_parallel_size GPUs; "
        "stages may sit on different nodes (vLLM's Ray executor). For models that do not fit "
        "one node; it adds a pipeline bubble per step."
    )
    max_model_len: Optional[int] = Field(
        None, ge=16, description="Context length. None: the model's own. Lower saves KV cache."
    )
    max_num_seqs: int = Field(
        256, ge=1, description="Sequences one engine schedules at once. Higher raises "
        "throughput until the KV cache is full."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_gib: int = Field(
        1, ge=1, description="KV cache of the CPU engine, in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    batch_size: int = Field(
        16, ge=1, description="Rows a job hands the engine pool per call. Small batches "
        "keep commits flowing; large ones cost fewer calls per row."
    )
    concurrent_batches: Optional[int] = Field(
        None, ge=1, description="Batches a job has at the pool at once: with batch_size, its "
        "bound on queued rows (and their memory). None: enough to keep every replica of its "
        "model fed (1.5 x max_num_seqs x replicas rows)."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments, passed as given."
    )
    tokenize_in_pipeline: bool = Field(
        True, description="Render chat rows through the chat template and tokenize prompts "
        "in the job's preprocess stage, so the replica receives token ids and its process "
        "only feeds the engine (pipeline/prompts.py). Costs each job's driver vLLM's "
        "tokenizer (about 4 s of CPU to import, in a background thread, and 350 MB); rows "
        "prepared before it has loaded, and every row where it cannot load, are rendered "
        "by the replica as before. It starts loading once the job's first rows are answered, "
        "so that neither they nor a cold engine's start wait for it. Off: the replica renders every row."
    )
    request_timeout_seconds: float = Field(
        600, gt=0, description="A request inside an engine this long means a hung engine: "
        "the replica is replaced and every row it had in flight, of every job, is retried. "
        "Counts time inside the engine only, not time queued behind other jobs; must exceed "
        "the slowest honest request: max_output_tokens at the engine's slowest decoding "
        "(the default allows 4096 tokens at ~7 tokens/s). Lower frees a hung engine's "
        "rows sooner."
    )
    max_failures_per_row: int = Field(
        2, ge=1, description="A row that was alone on an engine when it died or hung this "
        "many times becomes an engine_error row and is not sent again, so that one such "
        "row cannot restart engines forever. Rows in flight at a failure are retried "
        "alone first; rows that only shared a failing engine are never blamed."
    )
    max_engine_failures_per_job: int = Field(
        5, ge=1, description="Engine failures (deaths or hangs) one job's rows may cause, "
        "counting those where its rows were all the engine had in flight. At the limit, "
        "each of its rows not yet answered becomes an engine_error row and is not sent: "
        "many poison rows cannot restart engines row after row. Failures shared with other "
        "jobs' rows are not counted (the job may not be to blame)."
    )
    kind: str = Field("vllm", description="'vllm', or 'scripted': the deterministic test "
                      "engine (engines/scripted.py), for fault injection only.")
    task: Literal["generate", "embed"] = Field(
        "generate", description="What the model's replicas answer. 'generate': chat and "
        "completion rows. 'embed': /v1/embeddings rows only; vLLM runs the model as a "
        "pooling model (engine args runner='pooling', convert='embed', which also turns "
        "a generative checkpoint into an embedding model). A row for the other kind is an "
        "unsupported_url_for_model error row, refused before it reaches an engine."
    )


class RunConfig(BaseModel):
    """One batch job as the data plane runs it."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="A .jsonl file or a folder/prefix of .jsonl shards.")
    output: str = Field(description="A folder/prefix for results, errors and commit records.")
    model: str = Field(description="A Hugging Face model ID or a local path.")
    served_model_name: Optional[str] = Field(
        None, description="The name answers carry in `model`; None: `model` itself. The "
        "service sets the job's model name, so a catalog path never shows."
    )
    inference_parameters: InferenceParameters = Field(default_factory=InferenceParameters)
    lora: Optional[AdapterRouting] = Field(
        None, description="LoRA adapters of `model` that rows may name in `body.model` "
        "(raybatch/adapters.py); engine_args get enable_lora and max_loras. None: the "
        "model has none and `body.model` is ignored."
    )
    precision: Precision = Precision.PRECISION_UNSPECIFIED
    output_cap_bytes: int = Field(8 * GIB, ge=1, description="Committed output never passes this.")
    max_line_bytes: int = Field(MIB, ge=64, description="Longer input lines are error rows.")
    # Bounds on expensive rows. A row over one is an error row with its own code (its
    # custom_id echoed, the rest of the job unaffected); the check runs on the row's body
    # merged with the job's inferenceParameters.
    max_n: int = Field(DEFAULT_MAX_N, ge=1, description="Largest `n` (choices) a row may ask "
                       "for; more is an n_too_large row. Each choice is a sequence of its own "
                       "in the engine: n multiplies a row's cost.")
    max_output_tokens: int = Field(
        DEFAULT_MAX_OUTPUT_TOKENS, ge=1, description="Largest max_tokens / max_completion_tokens "
        "(and min_tokens) a row may ask for; more is a max_tokens_too_large row. A row that "
        "sets none gets at most this many (not the whole context). Higher serves long "
        "generations; each token of each choice is engine time."
    )
    max_top_logprobs: int = Field(
        DEFAULT_MAX_TOP_LOGPROBS, ge=0, le=20, description="Most alternatives per token a row "
        "may ask for (chat `top_logprobs`, completions `logprobs`); more is a "
        "logprobs_too_large row. Each costs a sort over the vocabulary and bytes in every "
        "output line, per token."
    )
    max_json_schema_bytes: int = Field(
        DEFAULT_MAX_JSON_SCHEMA_BYTES, ge=2, description="Largest `response_format.json_schema."
        "schema` (compact JSON, UTF-8 bytes); larger is a json_schema_too_large row. The "
        "engine compiles a grammar from each schema, in its own loop, before any token."
    )
    # Bounds on images in chat rows (pipeline/images.py); each over-limit image is an
    # error row with its own code.
    max_image_bytes: int = Field(
        DEFAULT_MAX_IMAGE_BYTES, ge=1, description="Largest image (bytes as fetched or decoded "
        "from a data: URL); larger is an image_too_large row. An image travels with its row "
        "through every stage as base64: this times max_images_per_row bounds a row's memory."
    )
    max_images_per_row: int = Field(
        DEFAULT_MAX_IMAGES_PER_ROW, ge=0, description="Most `image_url` parts one chat row may "
        "hold; more is a too_many_images row. 0 refuses every image."
    )
    image_fetch_timeout_seconds: float = Field(
        DEFAULT_IMAGE_FETCH_TIMEOUT_SECONDS, gt=0, description="Longest one image URL's fetch "
        "may take; longer is an image_fetch_failed row. A batch's fetches run at once, so a "
        "slow URL holds up its own batch's preparation by about this much."
    )
    image_url_schemes: list[Literal["https", "http", "s3"]] = Field(
        list(DEFAULT_IMAGE_URL_SCHEMES), description="URL schemes of images the job fetches "
        "(of 'https', 'http', 's3'); data: URLs are always taken. Any other (file://...) is an "
        "image_url_unsupported row. The service fetches with its own network position and "
        "(s3) credentials: list only what its users may reach through it."
    )
    max_custom_id_bytes: int = Field(
        DEFAULT_MAX_CUSTOM_ID_BYTES, ge=1, description="Longest `custom_id` (UTF-8 bytes); a longer one is a "
        "custom_id_too_long error row and is never echoed. The input scan keeps a fixed-size "
        "digest per line whatever this is; the limit bounds what result and error files echo."
    )
    max_shard_bytes: Optional[int] = Field(
        None, ge=1, description="Largest size one input shard may expand to (a gzip shard "
        "counts decompressed); past it the run stops with InputTooLarge before any engine "
        "starts. None: no limit (`raybatch run` on the operator's own input). The service "
        "sets its max_dataset_bytes here, so a shard swapped after validation or a gzip "
        "bomb cannot make a reader decompress without end."
    )
    part_max_rows: int = Field(
        1000, ge=1, description="Rows per committed part. Smaller parts lose less work "
        "on a crash and publish progress sooner; larger parts mean fewer objects."
    )
    part_max_bytes: int = Field(16 * MIB, ge=1)
    part_max_seconds: float = Field(
        5.0, gt=0, description="A part is committed at least this often while rows arrive."
    )
    part_quiet_seconds: float = Field(
        1.0, gt=0, description="Rows held for a part are committed once no new rows came "
        "for this long: a burst of answers shows in the job's progress at once, not up to "
        "part_max_seconds later. At most one part more per burst."
    )
    in_driver_bytes: int = Field(
        32 * MIB, ge=0, description="Inputs up to this size (stored bytes) are scanned and "
        "streamed through the pipeline in the job's driver process; larger ones through Ray "
        "Data, which spreads reading and preparation over the cluster. Ray Data starts new "
        "worker processes for every job (seconds before the first row); a small input "
        "needs none. 0: always Ray Data."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    engine_pool: Optional[str] = Field(
        None, description="Name of the service's engine pool actor, whose warm replicas "
        "this job shares with every other job. None: the run starts a pool of its own and "
        "stops it at the end (`raybatch run`)."
    )
    account: str = Field("local", description="Whose job this is: the pool shares engines "
                         "fairly between accounts, then between an account's jobs.")
    job_id: Optional[str] = Field(None, description="The service's batch job id, for metrics "
                                  "and logs; None for `raybatch run`.")
    skip_succeeded_in: list[str] = Field(
        default_factory=list, description="Output folders of earlier runs on the same "
        "input (a continuation's parent chain): lines they answered successfully are "
        "skipped and not counted; their error rows and unprocessed lines run here."
    )


def default_storage() -> str:
    return os.environ.get("RAYBATCH_STORAGE") or os.path.expanduser("~/.raybatch/storage")


class ModelEntry(BaseModel):
    """A model the service serves under a short name (the job's `model` field)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Hugging Face model ID or a path every node can read.")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields "
                                   "for this model, over the service's run_defaults; "
                                   "`engine_args` are merged key by key.")
    aliases: list[str] = Field(default_factory=list, description="Further names a job's "
                               "`model` may use for this entry, e.g. a Fireworks name "
                               "(`accounts/fireworks/models/...`). They override the shipped "
                               "Fireworks table (raybatch/jobs/model_names.py), which already "
                               "serves an entry keyed by a Hugging Face ID under its "
                               "Fireworks name.")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters of "
                                     "this model: name → path (a folder every node can "
                                     "read, or a Hugging Face ID) in PEFT's layout. A job's "
                                     "`model` or a row's `body.model` may name one; the "
                                     "base model's replicas load it on first use and serve "
                                     "every adapter's rows and the base's alike. Set "
                                     "`max_lora_rank` in engine_args for adapters of rank "
                                     "above 16, and `max_loras` (default: the number of "
                                     "adapters, at most 4) for how many a replica holds at "
                                     "once; on CPU it is at least one more than the number "
                                     "of adapters (raybatch/adapters.py says why).")


class AccountQuota(BaseModel):
    """One account's quotas where they differ from the service-wide ones: each field
    left out (None) takes the ServiceConfig setting of the same meaning."""

    model_config = ConfigDict(extra="forbid")

    max_datasets: Optional[int] = Field(None, ge=0)
    max_stored_bytes: Optional[int] = Field(None, ge=0)
    max_queued_jobs: Optional[int] = Field(None, ge=0)
    max_running_jobs: Optional[int] = Field(None, ge=1)
    requests_per_second: Optional[float] = Field(None, gt=0)
    request_burst: Optional[int] = Field(None, ge=1)


class Quota(BaseModel):
    """An account's quotas, every one resolved (`ServiceConfig.quota`)."""

    max_datasets: int
    max_stored_bytes: int
    max_queued_jobs: int
    max_running_jobs: int
    requests_per_second: float
    request_burst: int


class ServiceConfig(BaseModel):
    """The control plane's settings (`raybatch up`, the Serve config's `args`)."""

    model_config = ConfigDict(extra="forbid")

    storage: str = Field(default_factory=default_storage, description="Root of every record "
                         "and file: a local folder, file:// or s3:// URL every node can reach.")
    max_dataset_bytes: int = Field(500 * MIB, ge=1, description="Total size limit of one dataset, "
                                   "as its files expand (gzip files count decompressed), checked "
                                   "at :validateUpload and again by each job's reader. Compressed "
                                   "bytes would let a few MB of gzip stand for gigabytes.")
    max_upload_bytes: int = Field(150 * MIB, ge=1, description="Largest `:upload` request body.")
    validation_wait_seconds: float = Field(1.0, ge=0, description=":validateUpload and "
                                           ":upload wait this long for the dataset's "
                                           "validation: one validated by then answers READY "
                                           "(or its error) at once; a larger one answers "
                                           "UPLOADING and validates in the background, its "
                                           "progress in status.message. Longer waits hold "
                                           "a request (and an API thread) longer.")
    validation_stale_seconds: float = Field(30.0, gt=0, description="A validation whose "
                                            "replica has not written its heartbeat (every "
                                            "second) for this long is taken to have "
                                            "stopped: the next GET of the dataset runs it "
                                            "again.")
    max_concurrent_validations: int = Field(2, ge=1, description="Validations one API "
                                            "replica runs at once (each a thread reading "
                                            "and expanding files); more wait their turn.")
    max_upload_files: int = Field(100, ge=1, description="Most files one :getUploadEndpoint "
                                  "request may register (one signed URL each). Each URL is "
                                  "an open write into storage until it expires; more files "
                                  "than this are refused (400).")
    max_json_body_bytes: int = Field(MIB, ge=1024, description="Largest body of any other request.")
    max_running_jobs: int = Field(8, ge=1, description="Jobs running at once; the rest wait "
                                  "PENDING. Running jobs share the engine pool's replicas "
                                  "(rows interleaved by fair share), so more jobs add no "
                                  "engines; each costs a driver process (~0.5 GiB).")
    max_running_jobs_per_account: int = Field(4, ge=1, description="Jobs of one account "
                                              "running at once; its others wait PENDING "
                                              "while other accounts' jobs start.")
    # Per-account quotas. Over one, a request that would add to it gets 429
    # RESOURCE_EXHAUSTED saying which quota and how to free it; `account_quotas` sets
    # other values for named accounts.
    max_datasets_per_account: int = Field(1000, ge=0, description="Datasets one account "
                                          "may hold, its jobs' output datasets included "
                                          "(a job that cannot make one is refused).")
    max_stored_bytes_per_account: int = Field(50 * GIB, ge=0, description="Bytes one "
                                              "account may store: READY datasets at their "
                                              "sizeBytes (expanded size; a job's output at "
                                              "its committed bytes), UPLOADING ones at the "
                                              "bytes received. Uploads past it are refused; "
                                              "so are new jobs while it is full (their output "
                                              "would add to it).")
    max_queued_jobs_per_account: int = Field(100, ge=0, description="Jobs of one account "
                                             "waiting to run (VALIDATING, PENDING, "
                                             "RE_QUEUEING); a new job past it is refused. "
                                             "With max_job_duration_seconds it bounds how "
                                             "much engine time one account can line up.")
    requests_per_second_per_key: float = Field(20, gt=0, description="Rate limit of each "
                                               "API key (token bucket), per API replica: "
                                               "past it a request gets 429 with Retry-After. "
                                               "Signed file URLs are not counted.")
    request_burst_per_key: int = Field(100, ge=1, description="Requests a key may send at "
                                       "once after being idle (the bucket's size).")
    account_quotas: dict[str, AccountQuota] = Field(default_factory=dict, description="Quotas "
                                                    "of named accounts where they differ "
                                                    "from the settings above.")
    account_weights: dict[str, float] = Field(default_factory=dict, description="Share of "
                                              "the engines per account (default 1): an "
                                              "account of weight 2 gets twice the rows of "
                                              "one of weight 1 while both have rows queued.")
    admin_accounts: list[str] = Field(default_factory=list, description="Accounts whose keys "
                                      "may read the service's admin routes (the engine "
                                      "pool's replicas).")
    max_job_duration_seconds: float = Field(24 * 3600, gt=0, description="A job running "
                                            "longer EXPIRES, keeping partial results.")
    spare_drivers: int = Field(2, ge=0, description="Idle job drivers kept ready: started "
                               "ahead of the jobs that will need them, and taken back when "
                               "their job ends. A job given a spare skips its driver's process "
                               "start and imports (seconds on a small machine, 20 s beside "
                               "busy engines); two let two jobs created together both start "
                               "at once. Each holds an idle process of a few hundred MB.")
    spare_driver_idle_seconds: float = Field(900, gt=0, description="A spare that gets no job "
                                             "in this time exits (the scheduler starts a new "
                                             "one), so a spare outlives a stopped scheduler "
                                             "by this much at most.")
    progress_interval_seconds: float = Field(2.0, gt=0, description="How often the scheduler "
                                             "publishes jobProgress and checks drivers (every 0.5 s at "
                                             "most while a new job waits for its first rows).")
    signed_url_seconds: int = Field(3600, ge=1, description="Lifetime of upload/download URLs. "
                                    "Upload URLs also end when their dataset is READY, when "
                                    "a new :getUploadEndpoint replaces their registration, "
                                    "or when the key that asked for them is revoked.")
    # Datasets read in place from an `externalUrl` (api/external_urls.py), with the
    # service's own storage credentials: these settings bound what a tenant may name.
    external_url_schemes: list[str] = Field(["s3", "gs", "https"], description="Schemes a "
                                            "dataset's externalUrl may use. Local files "
                                            "(file://, plain paths) are never allowed; add "
                                            "'http' only for a trusted internal mirror.")
    external_url_prefixes: list[str] = Field(default_factory=list, description="If set, an "
                                             "externalUrl must lie under one of these "
                                             "prefixes (e.g. 's3://shared-corpora/'): the "
                                             "service's credentials may reach more than "
                                             "tenants should read.")
    external_url_private_hosts: bool = Field(False, description="Let an http(s) externalUrl "
                                             "name a loopback, private or link-local address "
                                             "(the service's own network, a cloud metadata "
                                             "endpoint). Off: such URLs are refused (400).")
    models: dict[str, ModelEntry] = Field(default_factory=dict, description="The model "
                                          "catalog: the names a job's `model` may use. A job "
                                          "naming any other model is refused at create (400) "
                                          "unless allow_any_model is on.")
    allow_any_model: bool = Field(False, description="Let a job name any Hugging Face ID or "
                                  "local path not in the catalog, handed to vLLM as is. Only for "
                                  "a service whose every tenant is trusted as the operator is: a "
                                  "tenant then makes GPU workers (which hold the storage "
                                  "credentials) download and load a repository it controls (vLLM "
                                  "has run code from a model's config more than once), fill "
                                  "disks, use the operator's HF_TOKEN, load any local model or "
                                  "probe local folders. trust_remote_code stays off for such "
                                  "models.")
    account_models: dict[str, list[str]] = Field(default_factory=dict, description="Per-account "
                                                 "allowlist of catalog names: an account listed "
                                                 "here may use only those; unlisted accounts use "
                                                 "the whole catalog. Names must be in `models`.")
    run_defaults: dict[str, Any] = Field(default_factory=dict, description="Further RunConfig "
                                         "fields for every job (engine, part sizes, cap). Cannot "
                                         "turn on trust_remote_code: that belongs to the catalog "
                                         "entries whose models need it, so it never reaches "
                                         "another model.")

    def quota(self, account: str) -> Quota:
        """The account's quotas: its `account_quotas` entry over the service-wide ones."""
        own = self.account_quotas.get(account) or AccountQuota()
        defaults = Quota(
            max_datasets=self.max_datasets_per_account,
            max_stored_bytes=self.max_stored_bytes_per_account,
            max_queued_jobs=self.max_queued_jobs_per_account,
            max_running_jobs=self.max_running_jobs_per_account,
            requests_per_second=self.requests_per_second_per_key,
            request_burst=self.request_burst_per_key,
        )
        return defaults.model_copy(update=own.model_dump(exclude_none=True))

    @model_validator(mode="after")
    def _model_access_is_consistent(self) -> "ServiceConfig":
        for account, names in self.account_models.items():
            unknown = sorted(set(names) - set(self.models))
            if unknown:
                raise ValueError(f"account_models[{account!r}] names models not in the catalog: {', '.join(unknown)}")
        claimed: dict[str, str] = {}
        for name, entry in self.models.items():
            for alias in entry.aliases:
                if alias in self.models or alias in claimed:
                    other = alias if alias in self.models else claimed[alias]
                    raise ValueError(f"model alias {alias!r} of {name!r} is already the name of {other!r}")
                claimed[alias] = name
        for name, entry in self.models.items():
            for adapter in entry.adapters:
                if adapter in self.models or adapter in claimed:
                    other = adapter if adapter in self.models else claimed[adapter]
                    raise ValueError(f"adapter {adapter!r} of {name!r} is already the name of {other!r}")
                claimed[adapter] = name
        engine_args = (self.run_defaults.get("engine") or {}).get("engine_args") or {}
        if engine_args.get("trust_remote_code"):
            raise ValueError("run_defaults cannot turn on trust_remote_code: set it in the engine_args "
                             "of the catalog entries whose models need it")
        return self
