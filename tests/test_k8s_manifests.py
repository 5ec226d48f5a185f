"""k8s/ manifests against the real KubeRay CRDs (jsonschema on openAPIV3Schema, plus a walk
that rejects fields the schema does not know, duplicate list-map keys and broken CEL rules),
a mirror of the operator's own spec validation, the Serve config against Ray's schema, and
the cross-references between the RayService, the RayJob, Redis and the artifact volume."""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import inspect
import re
import shlex
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import redis
import yaml
from jsonschema import Draft7Validator, FormatChecker

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_DIR = Path(__file__).resolve().parents[1] / "k8s" / "crds"  # vendored, see its README
IMPORT_PATH = "inlaid_ray.serve.app:build_app"
SERVE_ARGS = {"model_dir", "artifact_dir", "redis_url", "policy", "autoscaling", "num_gpus_per_replica"}
MAX_NAME_LEN = 47  # KubeRay MaxRayServiceNameLength / MaxRayJobNameLength (53 - 6)
OBJECT_META = {"name", "namespace", "labels", "annotations", "finalizers", "generateName", "ownerReferences"}
# CEL rules (x-kubernetes-validations) of the CRDs, mirrored in Python. Rules using oldSelf
# only apply on update and are skipped; an unknown rule on a field we set fails the test.
CEL_RULES = {
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda v: v in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda v: not ("jobStatus" in v and "jobDeploymentStatus" in v),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)": lambda v: "jobStatus" in v or "jobDeploymentStatus" in v,
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda v: not (("onSuccess" in v or "onFailure" in v) and "deletionRules" in v),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda v: ("onSuccess" in v and "onFailure" in v) or "deletionRules" in v,
}
FORMATS = FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


# ---- loading ------------------------------------------------------------------------------


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def _one(name: str, kind: str) -> dict:
    docs = [d for d in _docs(name) if d["kind"] == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _ray_docs() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in _docs(f.name) if d["apiVersion"].startswith("ray.io/")]


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version of the KubeRay CRDs."""
    schemas = {}
    # libyaml when present: the pure-Python loader needs ~10 s per 1 MB CRD.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    assert ("ray.io/v1", "RayService") in schemas and ("ray.io/v1", "RayJob") in schemas, sorted(schemas)
    return schemas


# ---- schema checks ------------------------------------------------------------------------


def to_jsonschema(schema: dict) -> dict:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema draft 7: `nullable` becomes a
    null type, int-or-string gets its anyOf; x-kubernetes-* keys are left for the walk."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: to_jsonschema(v) for k, v in out["properties"].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = to_jsonschema(out["items"])
    for combinator in ("anyOf", "allOf", "oneOf"):
        if combinator in out:
            out[combinator] = [to_jsonschema(s) for s in out[combinator]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def schema_errors(doc: Any, schema: dict) -> list[str]:
    """jsonschema errors of `doc` against a (converted) CRD schema, with their paths."""
    validator = Draft7Validator(to_jsonschema(schema), format_checker=FORMATS)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def walk_problems(value: Any, schema: dict, path: str = "") -> list[str]:
    """What jsonschema does not catch in Kubernetes schemas: fields absent from `properties`
    (the API server silently prunes them, so a typo just vanishes), duplicate keys in
    x-kubernetes-list-type map/set lists, and CEL rules."""
    problems = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        open_object = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
        for key, sub in value.items():
            here = f"{path}.{key}"
            if props is not None and key in props:
                problems += walk_problems(sub, props[key], here)
            elif isinstance(extra, dict):
                problems += walk_problems(sub, extra, here)
            elif (props is not None or extra is False) and not open_object:
                problems.append(f"{here}: unknown field; known here: {sorted(props or [])}")
    elif isinstance(value, list):
        item_schema = schema.get("items", {})
        for i, item in enumerate(value):
            problems += walk_problems(item, item_schema, f"{path}[{i}]")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            ids = [tuple(item.get(k, item_schema.get("properties", {}).get(k, {}).get("default")) for k in keys)
                   for item in value]
            dups = sorted({i for i in ids if ids.count(i) > 1}, key=str)
            if dups:
                problems.append(f"{path}: duplicate {keys} entries {dups}")
        elif list_type == "set" and len({yaml.safe_dump(v) for v in value}) != len(value):
            problems.append(f"{path}: duplicate entries in a set list")
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            problems.append(f"{path}: CEL rule {rule['rule']!r} is not mirrored in CEL_RULES; add it")
        elif not check(value):
            problems.append(f"{path}: {rule['message']}")
    return problems


def crd_problems(doc: dict, crds: dict) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    assert key in crds, f"{doc['kind']} {doc['metadata']['name']}: {key} is not a served CRD version ({sorted(crds)})"
    schema = crds[key]
    unknown_meta = sorted(set(doc["metadata"]) - OBJECT_META)
    meta = [f".metadata.{k}: not an ObjectMeta field we expect" for k in unknown_meta]
    return schema_errors(doc, schema) + walk_problems(doc, schema) + meta


# ---- operator-side validation (ray-operator/controllers/ray/utils/validation.go) ----------


def _env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def operator_problems(doc: dict) -> list[str]:
    """The parts of KubeRay's ValidateRay{Service,Job}{Metadata,Spec} our manifests touch."""
    problems = []
    name = doc["metadata"]["name"]
    if len(name) > MAX_NAME_LEN or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"name {name!r} must be a DNS-1035 label of <= {MAX_NAME_LEN} chars")
    spec = doc["spec"]
    cluster = spec["rayClusterConfig"] if doc["kind"] == "RayService" else spec.get("rayClusterSpec")
    if doc["kind"] == "RayService":
        strategy = spec.get("upgradeStrategy", {}).get("type")
        if strategy not in (None, "NewCluster", "None"):
            problems.append(f"upgradeStrategy.type {strategy!r} must be NewCluster or None")
        if cluster["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
            problems.append("headGroupSpec.headService.metadata.name must not be set")
    if doc["kind"] == "RayJob":
        selector = spec.get("clusterSelector")
        if cluster is None and not selector:
            problems.append("one of rayClusterSpec or clusterSelector must be set")
        if selector and (not selector.get("ray.io/cluster") or spec.get("suspend")
                         or spec.get("submissionMode") == "SidecarMode"):
            problems.append("clusterSelector needs ray.io/cluster, no suspend and no SidecarMode")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if spec.get("activeDeadlineSeconds", 1) <= 0 or spec.get("backoffLimit", 0) < 0:
            problems.append("activeDeadlineSeconds must be > 0 and backoffLimit >= 0")
        if "runtimeEnvYAML" in spec:
            yaml.safe_load(spec["runtimeEnvYAML"])
    if cluster is None:
        return problems
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    if not head:
        problems.append("headGroupSpec needs a container")
    for group in cluster.get("workerGroupSpecs", []):
        if not group["template"]["spec"].get("containers"):
            problems.append(f"worker group {group['groupName']} needs a container")
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"worker group {group['groupName']}: need minReplicas <= replicas <= maxReplicas")
    head_env = _env_names(head[0])
    if "gcsFaultToleranceOptions" in cluster:
        if doc["metadata"].get("annotations", {}).get("ray.io/ft-enabled"):
            problems.append("ray.io/ft-enabled and gcsFaultToleranceOptions are both set")
        if "redis-password" in cluster["headGroupSpec"].get("rayStartParams", {}):
            problems.append("redis-password in rayStartParams conflicts with gcsFaultToleranceOptions")
        for var in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if var in head_env:
                problems.append(f"head env {var} conflicts with gcsFaultToleranceOptions")
    elif "RAY_REDIS_ADDRESS" in head_env:
        problems.append("RAY_REDIS_ADDRESS without gcsFaultToleranceOptions")
    if "REDIS_USERNAME" in head_env or "redis-username" in cluster["headGroupSpec"].get("rayStartParams", {}):
        problems.append("redis username must come from gcsFaultToleranceOptions.redisUsername")
    return problems


# ---- tests: CRD schema --------------------------------------------------------------------


def test_ray_manifests_exist():
    kinds = sorted(d["kind"] for d in _ray_docs())
    assert kinds == ["RayJob", "RayService"], kinds


@pytest.mark.parametrize("doc", _ray_docs(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_ray_manifest_matches_crd(doc, crds):
    problems = crd_problems(doc, crds)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", _ray_docs(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_ray_manifest_passes_operator_validation(doc):
    problems = operator_problems(doc)
    assert not problems, "\n".join(problems)


def test_gcs_fault_tolerance_uses_the_current_field(crds):
    """gcsFaultToleranceOptions exists in this CRD and replaces the old annotation."""
    service = _one("rayservice.yaml", "RayService")
    schema = crds[("ray.io/v1", "RayService")]["properties"]["spec"]["properties"]["rayClusterConfig"]
    assert "gcsFaultToleranceOptions" in schema["properties"]
    ft = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert "ray.io/ft-enabled" not in service["metadata"].get("annotations", {})


@pytest.mark.parametrize(
    "path, typo",
    [
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams"), "rayStartParam"),
        (("spec", "rayClusterConfig", "gcsFaultToleranceOptions", "redisAddress"), "redisAdress"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "volumeMounts"),
         "volumeMount"),
        (("spec", "serveConfigV2"), "serveConfigv2"),
    ],
)
def test_walk_catches_typos_jsonschema_misses(path, typo, crds):
    """The key walk is what catches misspelt fields: Kubernetes schemas rarely forbid
    additional properties, so plain jsonschema accepts them (and the API server drops them)."""
    doc = copy.deepcopy(_one("rayservice.yaml", "RayService"))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[typo] = parent.pop(path[-1])
    schema = crds[("ray.io/v1", "RayService")]
    problems = walk_problems(doc, schema)
    assert any(p.split(":")[0].endswith(f".{typo}") for p in problems), problems
    assert not schema_errors(doc, schema)


def test_walk_catches_duplicate_list_map_keys(crds):
    doc = copy.deepcopy(_one("rayservice.yaml", "RayService"))
    env = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "REDIS_URL", "value": "redis://elsewhere:6379/0"})
    problems = walk_problems(doc, crds[("ray.io/v1", "RayService")])
    assert any("duplicate ['name'] entries [('REDIS_URL',)]" in p for p in problems), problems


def test_schema_catches_wrong_types(crds):
    doc = copy.deepcopy(_one("rayjob-onboard.yaml", "RayJob"))
    doc["spec"]["backoffLimit"] = "zero"
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = 2**40  # int32
    errors = schema_errors(doc, crds[("ray.io/v1", "RayJob")])
    assert any(e.startswith("spec.backoffLimit:") for e in errors), errors
    assert any(e.startswith("spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas:") for e in errors), errors


def test_core_objects_match_borrowed_k8s_schemas(crds):
    """The CRDs embed core schemas (PodTemplateSpec, ServiceSpec, PersistentVolumeClaimSpec):
    use them to check the Redis Deployment, Service and the PVCs as strictly."""
    cluster = crds[("ray.io/v1", "RayService")]["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    pod_template = cluster["headGroupSpec"]["properties"]["template"]
    service_spec = crds[("ray.io/v1", "RayService")]["properties"]["spec"]["properties"]["serveService"]
    service_spec = service_spec["properties"]["spec"]
    volume = pod_template["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]
    pvc_spec = volume["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    objects = [
        (_one("redis.yaml", "Deployment")["spec"]["template"], pod_template),
        (_one("redis.yaml", "Service")["spec"], service_spec),
        (_one("redis.yaml", "PersistentVolumeClaim")["spec"], pvc_spec),
        (_one("pvc-artifacts.yaml", "PersistentVolumeClaim")["spec"], pvc_spec),
    ]
    for obj, schema in objects:
        problems = schema_errors(obj, schema) + walk_problems(obj, schema)
        assert not problems, "\n".join(problems)
    deployment = _one("redis.yaml", "Deployment")
    assert set(deployment["spec"]) <= {"replicas", "selector", "strategy", "template", "revisionHistoryLimit"}


# ---- tests: Serve config ------------------------------------------------------------------


def _serve_config() -> dict:
    return yaml.safe_load(_one("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])


def test_serve_config_is_a_valid_ray_serve_config():
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    config = _serve_config()
    parsed = ServeDeploySchema.model_validate(config)
    # Ray's models ignore unknown keys; check names ourselves so typos cannot hide.
    assert set(config) <= set(ServeDeploySchema.model_fields), set(config) - set(ServeDeploySchema.model_fields)
    assert set(config.get("http_options", {})) <= set(HTTPOptionsSchema.model_fields)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
    [app] = parsed.applications
    assert app.import_path == IMPORT_PATH
    assert set(app.args) == SERVE_ARGS, set(app.args) ^ SERVE_ARGS


def test_serve_config_matches_deploy_config_and_app_builder():
    apps = _serve_config()["applications"]
    deploy = REPO / "deploy" / "serve_config.yaml"
    if deploy.exists():
        deploy_paths = {a["import_path"] for a in yaml.safe_load(deploy.read_text())["applications"]}
        assert IMPORT_PATH in deploy_paths, f"{deploy} imports {deploy_paths}, the RayService {IMPORT_PATH}"
    if importlib.util.find_spec("inlaid_ray.serve.app") is not None:
        from inlaid_ray.serve import app as serve_app

        params = list(inspect.signature(serve_app.build_app).parameters.values())
        args_model = params[0].annotation
        if isinstance(args_model, str):
            args_model = inspect.get_annotations(serve_app.build_app, eval_str=True)[params[0].name]
        if hasattr(args_model, "model_validate"):
            args_model.model_validate(apps[0]["args"])  # the builder accepts exactly these args


def test_serve_resources_fit_the_gpu_group():
    args = _serve_config()["applications"][0]["args"]
    [group] = _one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(limits["nvidia.com/gpu"])
    assert args["num_gpus_per_replica"] <= gpus
    per_worker = gpus // args["num_gpus_per_replica"]
    # Serve's replica bounds fit the worker group's pod bounds, which the Ray autoscaler moves between.
    scaling = args["autoscaling"]
    assert scaling["min_replicas"] <= group["minReplicas"] * per_worker, (scaling, group)
    assert scaling["max_replicas"] <= group["maxReplicas"] * per_worker, (scaling, group)
    assert _one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


# ---- tests: cross references --------------------------------------------------------------


def _ray_pods() -> list[tuple[str, dict]]:
    """(label, pod spec) for every head and worker pod of every Ray manifest."""
    pods = []
    for doc in _ray_docs():
        cluster = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec")
        if cluster is None:
            continue
        pods.append((f"{doc['kind']}/head", cluster["headGroupSpec"]["template"]["spec"]))
        for group in cluster.get("workerGroupSpecs", []):
            pods.append((f"{doc['kind']}/{group['groupName']}", group["template"]["spec"]))
    return pods


def _documented_secrets() -> dict[tuple[str, str], str]:
    """(name, key) -> value of each Secret k8s/README.md's `kubectl create secret` commands make,
    with a value of the shape `openssl rand -hex N` gives (distinct per Secret)."""
    readme = (K8S / "README.md").read_text()
    found = re.findall(r"kubectl create secret generic (\S+) --from-literal=([\w-]+)=\$\(openssl rand -hex (\d+)\)", readme)
    assert found, "k8s/README.md must show how to create the Secrets"
    return {(name, key): hashlib.sha256(name.encode()).hexdigest()[: 2 * int(n)] for name, key, n in found}


def _secret_value(name: str, key: str) -> str:
    secrets = _documented_secrets()
    assert (name, key) in secrets, f"reference to secret {name!r} key {key!r}, not a documented one"
    return secrets[(name, key)]


def test_the_onboarding_job_probes_the_service_with_the_services_admin_key():
    """The RayJob runs on its own cluster: its probe must name the RayService's serve Service, and
    its pods must hold the same admin key as the serving pods (else validation refuses the job)."""
    service, job = _one("rayservice.yaml", "RayService"), _one("rayjob-onboard.yaml", "RayJob")
    endpoint = re.search(r"--endpoint (\S+)", job["spec"]["entrypoint"])
    assert endpoint and endpoint.group(1) == f"http://{service['metadata']['name']}-serve-svc:8000"
    keys = {name: {_resolve_env(c).get("INLAID_ADMIN_KEY") for c in spec["containers"]} for name, spec in _ray_pods()}
    assert all(len(k) == 1 and None not in k for k in keys.values()), keys
    assert len({k for ks in keys.values() for k in ks}) == 1, keys


def test_no_manifest_ships_a_secret_value():
    """A password in a committed manifest would be the same in every deployment."""
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), f"{path.name} defines Secret {doc['metadata']['name']!r}"


def _resolve_env(container: dict) -> dict[str, str]:
    """Container env with secret refs filled in and $(VAR) expanded as the kubelet does."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = _secret_value(ref["name"], ref["key"])
        else:
            # $(X) of an earlier variable expands; an undefined one stays literal, as in the kubelet.
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                      lambda m: env.get(m.group(1), m.group(0)), var["value"])
    return env


def test_redis_manifest_is_consistent_with_redis_url_and_gcs_ft():
    deployment, service = _one("redis.yaml", "Deployment"), _one("redis.yaml", "Service")
    pvc = _one("redis.yaml", "PersistentVolumeClaim")
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = template["spec"]["containers"]
    [svc_port] = service["spec"]["ports"]
    target = svc_port.get("targetPort", svc_port["port"])
    assert any(target in (p.get("name"), p["containerPort"]) for p in container["ports"]), (target, container["ports"])
    # Password: from the same Secret, passed to redis-server, URL-safe for REDIS_URL.
    password = _resolve_env(container)["REDIS_PASSWORD"]
    assert urllib.parse.quote(password, safe="") == password
    cmd = container["command"] + container["args"]
    assert cmd[cmd.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"  # registry keys must never be evicted
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    [mount] = container["volumeMounts"]
    assert cmd[cmd.index("--dir") + 1] == mount["mountPath"]
    [volume] = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and deployment["spec"]["strategy"]["type"] == "Recreate"
    # Every Ray pod's REDIS_URL and the GCS FT address point at this Service.
    host, port = service["metadata"]["name"], svc_port["port"]
    for label, pod in _ray_pods():
        for c in pod["containers"]:
            url = redis.connection.parse_url(_resolve_env(c)["REDIS_URL"])
            assert (url["host"], url["port"], url["password"]) == (host, port, password), (label, url)
    ft = _one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == f"{host}:{port}"
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert _secret_value(ref["name"], ref["key"]) == password


def test_all_ray_pods_share_artifacts_and_settings():
    pvc = _one("pvc-artifacts.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # head and workers sit on different nodes
    mounts, envs, images = set(), [], set()
    for label, pod in _ray_pods():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            images.add(c["image"])
            envs.append(_resolve_env(c))
            claims = [(m["mountPath"], volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName"))
                      for m in c["volumeMounts"]]
            assert (pvc_mount := [p for p, claim in claims if claim == pvc["metadata"]["name"]]), (label, claims)
            mounts.update(pvc_mount)
    assert len(mounts) == 1, f"artifact volume mounted at different paths: {mounts}"
    assert len(images) == 1, images
    assert all(e == envs[0] for e in envs), envs
    root = PurePosixPath(mounts.pop())
    args = _serve_config()["applications"][0]["args"]
    for key in ("model_dir", "artifact_dir"):
        assert PurePosixPath(args[key]).is_relative_to(root), (key, args[key], root)
    assert PurePosixPath(envs[0]["INLAID_CACHE_DIR"]).is_relative_to(root)


def test_gpu_workers_request_gpus():
    for label, pod in _ray_pods():
        if label.endswith("/head"):
            continue
        [c] = pod["containers"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, label
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), label


def test_onboarding_job_runs_the_cli():
    job = _one("rayjob-onboard.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["inlaid-ray", "onboard"]
    flags = {a for a in argv if a.startswith("--")}
    assert {"--task", "--tenant", "--adapter", "--calib"} <= flags, flags
    from inlaid_ray.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if "onboard" in sub.choices:  # once the CLI has it, the entrypoint must parse
        parser.parse_args(argv[1:])
    root = PurePosixPath(next(iter({m["mountPath"] for _, p in _ray_pods() for c in p["containers"]
                                     for m in c["volumeMounts"] if m["name"] == "artifacts"})))
    for flag in ("--adapter", "--calib"):
        assert PurePosixPath(argv[argv.index(flag) + 1]).is_relative_to(root), flag
