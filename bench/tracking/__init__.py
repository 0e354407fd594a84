"""The one door to MLflow: every MLflow call in bench goes through this package.

store.py: the tracking URI, the store check, experiments; runs.py: runs and what is logged to them,
the parent run workers share; models.py: logged models, the registry and its champion alias;
reading.py: reading runs back; handover.py: a confirm run's checkpoint and heartbeat on the run, for
resuming it on another machine. Runs use MLflow's fluent API, so a study shows in the UI as a tree:
one parent run per ``bench tune`` invocation and one nested run per trial.
"""

from . import handover, mlflow_log
from .store import (DEFAULT_TRACKING_URI, MLRUNS, TAG_KIND, TAG_NORM, TAG_STUDY, TAG_EXPERIMENT,
    TAG_STATE, TAG_TRIAL, TAG_ERROR, TAG_RESUMED, TAG_HARDWARE, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND, TRAINING_KINDS, mask_url,
    resolve_uri, _quiet, setup, artifact_location, experiment_id, tag_experiments)
from .runs import (run, mark_resumed, discard_active_run, system_metrics_enabled, log_params, log_dataset, log_metrics, set_tags,
    PARENT_SETTLE_SECONDS, open_parent, find_trial_run, run_params, close_run, trial_runs, log_to_run)
from .models import (log_model, log_predictions, CHAMPION, champion_uri, champion, promote_champion,
    active_model_uri, load_model)
from .reading import (PREDICTIONS, current_uri, search_runs, get_run, load_run_model, metric_history,
    load_predictions, log_folder)
