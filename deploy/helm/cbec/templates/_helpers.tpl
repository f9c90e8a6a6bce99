{{/* Names and labels. */}}
{{- define "cbec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cbec.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one service's objects: (dict "root" $ "name" "recommender"). */}}
{{- define "cbec.componentName" -}}
{{- printf "%s-%s" (include "cbec.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cbec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "cbec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: cbec
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector of one service's pods: (dict "root" $ "name" "recommender"). */}}
{{- define "cbec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cbec.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "cbec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cbec.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The enabled services as YAML: name -> the service block laid over `defaults`. A service's value
replaces the default; for maps, the service's keys replace the default's keys (one level deep), so
`gpu: {count: 1}` keeps the default GPU tolerations. Explicit false/0 values are kept (no sprig merge,
which treats them as empty).
*/}}
{{- define "cbec.services" -}}
{{- $defaults := .Values.defaults -}}
{{- $out := dict -}}
{{- range $name, $svc := .Values.services -}}
{{- if not (kindIs "map" $svc) -}}
{{- fail (printf "services.%s must be a map" $name) -}}
{{- end -}}
{{- $merged := dict -}}
{{- range $key, $value := $defaults -}}
{{- if hasKey $svc $key -}}
{{- $own := get $svc $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $own) -}}
{{- $m := deepCopy $value -}}
{{- range $k, $v := $own -}}{{- $_ := set $m $k $v -}}{{- end -}}
{{- $_ := set $merged $key $m -}}
{{- else -}}
{{- $_ := set $merged $key $own -}}
{{- end -}}
{{- else -}}
{{- $_ := set $merged $key (deepCopy $value) -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := $svc -}}
{{- if not (hasKey $defaults $key) -}}{{- $_ := set $merged $key $value -}}{{- end -}}
{{- end -}}
{{- if $merged.enabled -}}
{{- $_ := set $out $name $merged -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The enabled services that serve a model, as a YAML list of names. */}}
{{- define "cbec.modelServiceNames" -}}
{{- $names := list -}}
{{- range $name, $s := (include "cbec.services" . | fromYaml) -}}
{{- if $s.model -}}{{- $names = append $names $name -}}{{- end -}}
{{- end -}}
{{- toYaml $names -}}
{{- end -}}

{{/* Container image of one service: (dict "root" $ "name" $name "svc" $s). */}}
{{- define "cbec.image" -}}
{{- $root := .root -}}
{{- $s := .svc -}}
{{- $repo := $s.image.repository | default (printf "%s/cbec-%s" $root.Values.image.registry .name) -}}
{{- $tag := $s.image.tag | default $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- if gt (int $s.gpu.count) 0 -}}
{{- if not $s.gpuImage -}}
{{- fail (printf "services.%s.gpu.count is %v but the service has no GPU image (services.%s.gpuImage=false)" .name $s.gpu.count .name) -}}
{{- end -}}
{{- $tag = printf "%s%s" $tag $root.Values.image.gpuSuffix -}}
{{- end -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* The models PVC's name. */}}
{{- define "cbec.modelsClaim" -}}
{{- .Values.models.pvc.existingClaim | default (printf "%s-models" (include "cbec.fullname" .)) -}}
{{- end -}}

{{/* An object store URL as an rclone remote: s3://b/p -> :s3:b/p, gs://b/p -> :gcs:b/p. */}}
{{- define "cbec.rcloneRemote" -}}
{{- $u := . -}}
{{- if hasPrefix "s3://" $u -}}
{{- printf ":s3:%s" (trimPrefix "s3://" $u) -}}
{{- else if hasPrefix "gs://" $u -}}
{{- printf ":gcs:%s" (trimPrefix "gs://" $u) -}}
{{- else -}}
{{- $u -}}
{{- end -}}
{{- end -}}

{{/* The PromQL matcher selecting this release's services: service=~"a|b|c". */}}
{{- define "cbec.serviceMatcher" -}}
{{- $names := keys (include "cbec.services" . | fromYaml) | sortAlpha -}}
{{- printf "service=~\"%s\"" (join "|" $names) -}}
{{- end -}}

{{/*
The enabled services a service calls, as a YAML list: its block's `calls`, where "*" is every other
enabled service: (dict "name" $name "services" $services). They get the service's upstream address
settings (cbec.env), its NetworkPolicy egress and their ingress from it (networkpolicy.yaml). The service
registry (services/runtime/registry.py) declares the same calls; tests/runtime/test_registry.py renders
the chart and checks both agree.
*/}}
{{- define "cbec.upstreams" -}}
{{- $name := .name -}}
{{- $calls := (get .services .name | default dict).calls | default list -}}
{{- $out := list -}}
{{- range $other := keys .services | sortAlpha -}}
{{- if and (ne $other $name) (or (has "*" $calls) (has $other $calls)) -}}
{{- $out = append $out $other -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The enabled services that call a service, as a YAML list: (dict "name" $name "services" $services). */}}
{{- define "cbec.callers" -}}
{{- $name := .name -}}
{{- $services := .services -}}
{{- $out := list -}}
{{- range $caller := keys $services | sortAlpha -}}
{{- if has $name (include "cbec.upstreams" (dict "name" $caller "services" $services) | fromYamlArray) -}}
{{- $out = append $out $caller -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The module a service's container runs (python -m <module>): (dict "name" $name "svc" $s). */}}
{{- define "cbec.module" -}}
{{- .svc.module | default (printf "services.%s" .name) -}}
{{- end -}}

{{/* The Secret the chart creates for the bundled stores' passwords. */}}
{{- define "cbec.stateSecretName" -}}
{{- printf "%s-state" (include "cbec.fullname" .) -}}
{{- end -}}

{{/*
The state settings as YAML: backend, dir, and for the shared backend one entry per store with
  mode (bundled | external), url, port, secretName and secretKey (both empty: no password).
*/}}
{{- define "cbec.state" -}}
{{- $root := . -}}
{{- $st := .Values.state -}}
{{- $out := dict "backend" $st.backend "dir" $st.dir -}}
{{- if eq $st.backend "shared" -}}
{{- range $store, $defaultPort := dict "postgres" 5432 "redis" 6379 -}}
{{- $cfg := get $st $store -}}
{{- $e := dict -}}
{{- if $cfg.external.url -}}
{{- $host := (urlParse $cfg.external.url).host -}}
{{- $port := $defaultPort -}}
{{- if regexMatch ":[0-9]+$" $host -}}{{- $port = regexFind "[0-9]+$" $host | int -}}{{- end -}}
{{- $e = dict "mode" "external" "url" $cfg.external.url "port" $port "secretName" "" "secretKey" "" -}}
{{- if $cfg.external.existingSecret -}}
{{- $_ := set $e "secretName" $cfg.external.existingSecret -}}
{{- $_ := set $e "secretKey" $cfg.external.passwordKey -}}
{{- end -}}
{{- else if $cfg.bundled.enabled -}}
{{- $b := $cfg.bundled -}}
{{- $host := printf "%s.%s.svc.%s" (include "cbec.componentName" (dict "root" $root "name" $store)) $root.Release.Namespace $root.Values.clusterDomain -}}
{{- $url := printf "redis://%s:%d/0" $host $defaultPort -}}
{{- if eq $store "postgres" -}}
{{- $url = printf "postgresql://%s@%s:%d/%s" $b.user $host $defaultPort $b.database -}}
{{- end -}}
{{- $e = dict "mode" "bundled" "url" $url "port" $defaultPort "secretName" ($b.existingSecret | default (include "cbec.stateSecretName" $root)) "secretKey" $b.passwordKey -}}
{{- end -}}
{{- $_ := set $out $store $e -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
The chat LLM endpoint as YAML: mode (inProcess | external | server); for external and server also url
(the API base chat calls) and port (for chat's egress).
*/}}
{{- define "cbec.llm" -}}
{{- $l := .Values.llm -}}
{{- $out := dict "mode" $l.mode -}}
{{- if eq $l.mode "server" -}}
{{- $host := printf "%s.%s.svc.%s" (include "cbec.componentName" (dict "root" . "name" "llm")) .Release.Namespace .Values.clusterDomain -}}
{{- $_ := set $out "url" (printf "http://%s:%d/v1" $host (int $l.server.port)) -}}
{{- $_ := set $out "port" (int $l.server.port) -}}
{{- else if eq $l.mode "external" -}}
{{- $u := urlParse $l.external.url -}}
{{- $port := ternary 443 80 (eq $u.scheme "https") -}}
{{- if regexMatch ":[0-9]+$" $u.host -}}{{- $port = regexFind "[0-9]+$" $u.host | int -}}{{- end -}}
{{- $_ := set $out "url" $l.external.url -}}
{{- $_ := set $out "port" $port -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
Refuse combinations the JSON schema cannot express (it cannot see the services merged over defaults).
Renders nothing.
*/}}
{{- define "cbec.validate" -}}
{{- $root := . -}}
{{- include "cbec.validateAuth" . -}}
{{- if and (eq .Values.llm.mode "external") (not .Values.llm.external.url) -}}
{{- fail "llm.mode is external but llm.external.url is empty: set the OpenAI-compatible API base (https://host/v1)" -}}
{{- end -}}
{{- $st := .Values.state -}}
{{- range $store := list "postgres" "redis" -}}
{{- $cfg := get $st $store -}}
{{- if eq $st.backend "shared" -}}
{{- if and $cfg.external.url $cfg.bundled.enabled -}}
{{- fail (printf "state.%s: both external.url and bundled.enabled are set; for an external %s set state.%s.bundled.enabled=false" $store $store $store) -}}
{{- end -}}
{{- if not (or $cfg.external.url $cfg.bundled.enabled) -}}
{{- fail (printf "state.backend is shared but state.%s is neither bundled (state.%s.bundled.enabled=true) nor external (state.%s.external.url)" $store $store $store) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $st.backend "shared") $st.postgres.bundled.enabled $st.redis.bundled.enabled (not $st.postgres.bundled.existingSecret) (not $st.redis.bundled.existingSecret) (eq $st.postgres.bundled.passwordKey $st.redis.bundled.passwordKey) -}}
{{- fail "state.postgres.bundled.passwordKey and state.redis.bundled.passwordKey must differ (both are keys of the chart's state Secret)" -}}
{{- end -}}
{{- range $name, $s := (include "cbec.services" $root | fromYaml) -}}
{{- range $up := $s.calls | default list -}}
{{- if not (or (eq $up "*") (hasKey $root.Values.services $up)) -}}
{{- fail (printf "services.%s.calls names %s, which is no service of the chart" $name $up) -}}
{{- end -}}
{{- end -}}
{{- /* CBEC_<SERVICE>_* is read by that service only (services/runtime/registry.py): in another block it does nothing. */ -}}
{{- range $key, $_ := $s.env -}}
{{- range $other, $_ := $root.Values.services -}}
{{- if and (ne $other $name) (hasPrefix (printf "CBEC_%s_" (upper $other)) $key) -}}
{{- fail (printf "services.%s.env.%s: only %s reads CBEC_%s_* settings; set it in services.%s.env" $name $key $other (upper $other) $other) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $st.backend "embedded") $s.stateful -}}
{{- if gt (int $s.replicas) 1 -}}
{{- fail (printf "state.backend is embedded: %s keeps its state in SQLite on one ReadWriteOnce volume, so services.%s.replicas must be 0 or 1 (is %v); use state.backend=shared (PostgreSQL + Redis) for more replicas" $name $name $s.replicas) -}}
{{- end -}}
{{- if $s.autoscaling.enabled -}}
{{- fail (printf "state.backend is embedded: %s keeps its state in SQLite on one ReadWriteOnce volume, so services.%s.autoscaling.enabled must be false; use state.backend=shared (PostgreSQL + Redis) to autoscale" $name $name) -}}
{{- end -}}
{{- end -}}
{{- if $s.training.enabled -}}
{{- if and (gt (int $s.training.gpus) 0) (not $s.gpuImage) -}}
{{- fail (printf "services.%s.training.gpus is %v but the service has no GPU image (services.%s.gpuImage=false)" $name $s.training.gpus $name) -}}
{{- end -}}
{{- if not $s.model -}}
{{- fail (printf "services.%s.training.enabled: %s serves no model (services.%s.model=false), there is nothing to train" $name $name $name) -}}
{{- end -}}
{{- if ne $root.Values.models.source "pvc" -}}
{{- fail (printf "services.%s.training.enabled needs models.source=pvc (training writes new versions into the models volume; models.source is %s)" $name $root.Values.models.source) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A container's environment, as YAML list items: (dict "root" $ "name" $name "svc" $s "services" $services
"train" false). Plain values first, sorted by name (the service's own env wins), then the secrets.
Serving containers also get ports, the pinned model version, model polling and backend addresses.
*/}}
{{- define "cbec.env" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $s := .svc -}}
{{- $services := .services -}}
{{- $train := .train -}}
{{- $models := $root.Values.models -}}
{{- $useModels := and $s.model (ne $models.source "none") -}}
{{- $st := include "cbec.state" $root | fromYaml -}}
{{- $env := dict "HOME" "/tmp" "CBEC_LOG_LEVEL" $s.logLevel "CBEC_STATE_BACKEND" $st.backend "CBEC_STATE_DIR" $st.dir -}}
{{- if $train -}}
{{- $_ := set $env "CBEC_DEVICE" (ternary "cuda" "cpu" (gt (int $s.training.gpus) 0)) -}}
{{- else -}}
{{- $_ := set $env "CBEC_DEVICE" ($s.device | default (ternary "cuda" "cpu" (gt (int $s.gpu.count) 0))) -}}
{{- $_ := set $env "CBEC_HOST" "0.0.0.0" -}}
{{- $_ := set $env "CBEC_GRPC_PORT" (toString $s.grpcPort) -}}
{{- $_ := set $env "CBEC_METRICS_PORT" (toString $s.metricsPort) -}}
{{- $_ := set $env "CBEC_GRACE_PERIOD_S" (toString $s.gracePeriodSeconds) -}}
{{- if $s.httpPort -}}
{{- $_ := set $env (printf "CBEC_%s_HTTP_PORT" (upper $name)) (toString $s.httpPort) -}}
{{- $_ := set $env (printf "CBEC_%s_HTTP_HOST" (upper $name)) "0.0.0.0" -}}
{{- end -}}
{{- /* Service-to-service authentication (_tls.tpl): the token every call carries, the server's certificate
and the CA its callers' certificates must chain to, and the client certificate of a caller. */ -}}
{{- $_ := set $env "CBEC_INTERNAL_TOKEN_FILE" (printf "%s/token" (include "cbec.internalTokenDir" $root)) -}}
{{- $tlsDir := $root.Values.tls.mountPath -}}
{{- if include "cbec.tlsServes" (dict "root" $root "name" $name) -}}
{{- $_ := set $env "CBEC_TLS_CERT_FILE" (printf "%s/tls.crt" $tlsDir) -}}
{{- $_ := set $env "CBEC_TLS_KEY_FILE" (printf "%s/tls.key" $tlsDir) -}}
{{- $_ := set $env "CBEC_TLS_CLIENT_CA_FILE" (printf "%s/ca.crt" $tlsDir) -}}
{{- end -}}
{{- if and $root.Values.tls.enabled (include "cbec.callsServices" (dict "name" $name "services" $services)) -}}
{{- $_ := set $env "CBEC_BACKEND_TLS_CA_FILE" (printf "%s/ca.crt" $tlsDir) -}}
{{- $_ := set $env "CBEC_BACKEND_TLS_CERT_FILE" (printf "%s/tls.crt" $tlsDir) -}}
{{- $_ := set $env "CBEC_BACKEND_TLS_KEY_FILE" (printf "%s/tls.key" $tlsDir) -}}
{{- end -}}
{{- end -}}
{{- if $useModels -}}
{{- $_ := set $env "CBEC_MODELS_DIR" $models.mountPath -}}
{{- if not $train -}}
{{- $_ := set $env "CBEC_MODEL_VERSION" ($s.modelVersion | default "") -}}
{{- $poll := $s.modelPollSeconds -}}
{{- if eq (toString $poll) "auto" -}}
{{- $poll = ternary 60 0 (and $s.training.enabled (eq $models.source "pvc")) -}}
{{- end -}}
{{- $_ := set $env "CBEC_MODEL_POLL_S" (toString $poll) -}}
{{- end -}}
{{- end -}}
{{- if eq $st.backend "shared" -}}
{{- $_ := set $env "CBEC_DATABASE_URL" $st.postgres.url -}}
{{- $_ := set $env "CBEC_REDIS_URL" $st.redis.url -}}
{{- end -}}
{{- if not $train -}}
{{- /* Upstream addresses, CBEC_<SERVICE>_<UPSTREAM>_ADDR, for the services it calls (cbec.upstreams; dns:/// resolves every pod of a headless Service). */ -}}
{{- range $backend := include "cbec.upstreams" (dict "name" $name "services" $services) | fromYamlArray -}}
{{- $b := get $services $backend -}}
{{- $addr := printf "dns:///%s.%s.svc.%s:%v" (include "cbec.componentName" (dict "root" $root "name" $backend)) $root.Release.Namespace $root.Values.clusterDomain $b.grpcPort -}}
{{- $_ := set $env (printf "CBEC_%s_%s_ADDR" (upper $name) (upper $backend)) $addr -}}
{{- end -}}
{{- end -}}
{{- if and (eq $name "gateway") (not $train) -}}
{{- /* The gateway's share of the global rate limit while Redis is unreachable: rate / replicas. */ -}}
{{- $_ := set $env "CBEC_GATEWAY_RATE_LIMIT_REPLICAS" (toString (ternary $s.autoscaling.minReplicas $s.replicas $s.autoscaling.enabled)) -}}
{{- end -}}
{{- $llm := include "cbec.llm" $root | fromYaml -}}
{{- $remoteLLM := and (eq $name "chat") (not $train) (ne $llm.mode "inProcess") -}}
{{- if $remoteLLM -}}
{{- /* chat's LLM is an OpenAI-compatible endpoint (values: llm). */ -}}
{{- $_ := set $env "CBEC_CHAT_LLM_BACKEND" "openai" -}}
{{- $_ := set $env "CBEC_CHAT_LLM_URL" $llm.url -}}
{{- $_ := set $env "CBEC_CHAT_LLM_MODEL" $root.Values.llm.model -}}
{{- $_ := set $env "CBEC_CHAT_LLM_TIMEOUT_S" (toString $root.Values.llm.timeoutSeconds) -}}
{{- end -}}
{{- if and $root.Values.tracing.enabled (not $train) -}}
{{- /* OpenTelemetry (values: tracing): spans to the collector over OTLP/gRPC. */ -}}
{{- $_ := set $env "CBEC_TRACE_OTLP_ENDPOINT" $root.Values.tracing.otlpEndpoint -}}
{{- $_ := set $env "CBEC_TRACE_SAMPLE_RATIO" (toString $root.Values.tracing.sampleRatio) -}}
{{- end -}}
{{- range $k, $v := $s.env -}}
{{- $_ := set $env $k (toString $v) -}}
{{- end -}}
{{- range $k := keys $env | sortAlpha }}
- {name: {{ $k }}, value: {{ get $env $k | quote }}}
{{- end }}
{{- if eq $st.backend "shared" }}
{{- with $st.postgres.secretName }}
- name: CBEC_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $st.postgres.secretKey }}}
{{- end }}
{{- with $st.redis.secretName }}
- name: CBEC_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $st.redis.secretKey }}}
{{- end }}
{{- end }}
{{- range $s.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef: {name: {{ .secretName }}, key: {{ .key }}}
{{- end }}
{{- if and $remoteLLM $root.Values.llm.apiKey.existingSecret }}
- name: CBEC_CHAT_LLM_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ $root.Values.llm.apiKey.existingSecret }}, key: {{ $root.Values.llm.apiKey.key }}}
{{- end }}
{{- end -}}

{{/* The state volume of a service's pods: its claim (embedded backend, stateful) or an emptyDir. */}}
{{- define "cbec.stateVolume" -}}
{{- $root := .root -}}
{{- if and (eq $root.Values.state.backend "embedded") .svc.stateful -}}
- name: state
  persistentVolumeClaim:
    claimName: {{ include "cbec.stateClaim" (dict "root" $root "name" .name) }}
{{- else -}}
- name: state
  emptyDir: {sizeLimit: {{ $root.Values.state.cacheSizeLimit }}}
{{- end -}}
{{- end -}}

{{/* The embedded state claim of one service: (dict "root" $ "name" $name). */}}
{{- define "cbec.stateClaim" -}}
{{- printf "%s-state" (include "cbec.componentName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every pod that talks to the state stores carries (the stores admit only these). */}}
{{- define "cbec.stateClientLabels" -}}
app.kubernetes.io/name: {{ include "cbec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
cbec.ai/state-client: "true"
{{- end -}}

{{/* Selector of the training pods of the release (all services). */}}
{{- define "cbec.trainingSelectorLabels" -}}
app.kubernetes.io/name: {{ include "cbec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
cbec.ai/role: training
{{- end -}}

{{/* A name of (dict "root" $ "name" $name "suffix" "-train-3" "max" 63): the component name cut to fit. */}}
{{- define "cbec.suffixedName" -}}
{{- $base := include "cbec.componentName" (dict "root" .root "name" .name) -}}
{{- printf "%s%s" ($base | trunc (int (sub .max (len .suffix))) | trimSuffix "-") .suffix -}}
{{- end -}}

{{/*
A training pod template (metadata and spec): (dict "root" $ "name" $name "svc" $s). Its labels differ
from the service's, so Services, PDBs and the service's network policy never select it.
*/}}
{{- define "cbec.trainingPod" -}}
{{- $ := .root -}}
{{- $name := .name -}}
{{- $s := .svc -}}
{{- $t := $s.training -}}
{{- $gpus := int $t.gpus -}}
{{- $models := $.Values.models -}}
{{- $embedded := and (eq $.Values.state.backend "embedded") $s.stateful -}}
{{- $nodeSelector := deepCopy ($s.nodeSelector | default dict) -}}
{{- $tolerations := $s.tolerations | default list -}}
{{- if gt $gpus 0 -}}
{{- range $k, $v := $s.gpu.nodeSelector }}{{- $_ := set $nodeSelector $k $v }}{{- end -}}
{{- $tolerations = concat $tolerations ($s.gpu.tolerations | default list) -}}
{{- end -}}
{{- $imageSvc := deepCopy $s -}}
{{- $_ := set $imageSvc.gpu "count" $gpus -}}
metadata:
  labels:
    {{- include "cbec.trainingSelectorLabels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ printf "%s-train" $name }}
    app.kubernetes.io/part-of: cbec
    cbec.ai/service: {{ $name }}
    cbec.ai/state-client: "true"
    cbec.ai/gpus: {{ $gpus | quote }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "cbec.serviceAccountName" $ }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $s.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $s.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $.Values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  securityContext:
    {{- toYaml $.Values.podSecurityContext | nindent 4 }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $embedded }}
  # The service's state is SQLite on a ReadWriteOnce volume: train on the node that serves it.
  affinity:
    podAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        - topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "cbec.selectorLabels" (dict "root" $ "name" $name) | nindent 14 }}
  {{- else if $s.affinity }}
  affinity:
    {{- toYaml $s.affinity | nindent 4 }}
  {{- end }}
  containers:
    - name: train
      image: {{ include "cbec.image" (dict "root" $ "name" $name "svc" $imageSvc) }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      command: ["python", "-m", {{ printf "%s.train" (include "cbec.module" (dict "name" $name "svc" $s)) | quote }}]
      {{- with $t.args }}
      args:
        {{- range . }}
        - {{ . | quote }}
        {{- end }}
      {{- end }}
      {{- with $s.workingDir }}
      workingDir: {{ . }}
      {{- end }}
      env:
        {{- include "cbec.env" (dict "root" $ "name" $name "svc" $s "services" dict "train" true) | trim | nindent 8 }}
      resources:
        {{- $resources := deepCopy $t.resources -}}
        {{- if gt $gpus 0 -}}
        {{- $limits := deepCopy ($resources.limits | default dict) -}}
        {{- $_ := set $limits $s.gpu.resource (toString $gpus) -}}
        {{- $_ := set $resources "limits" $limits -}}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: state, mountPath: {{ $.Values.state.dir }}}
        - {name: models, mountPath: {{ $models.mountPath }}}
        {{- range $s.secretMounts }}
        - {name: {{ printf "secret-%s" .name }}, mountPath: {{ .mountPath }}, readOnly: true}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {sizeLimit: 4Gi}
    {{- include "cbec.stateVolume" (dict "root" $ "name" $name "svc" $s) | nindent 4 }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ include "cbec.modelsClaim" $ }}
    {{- range $s.secretMounts }}
    - name: {{ printf "secret-%s" .name }}
      secret:
        secretName: {{ .secretName }}
        defaultMode: 0440
    {{- end }}
{{- end }}

{{/* Egress rules every pod of the suite (services and training jobs) gets: DNS, the state stores, extraEgress. */}}
{{- define "cbec.commonEgress" -}}
{{- $root := . -}}
{{- $np := .Values.networkPolicy -}}
{{- $st := include "cbec.state" . | fromYaml -}}
# DNS
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
  {{- with $np.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- if eq $st.backend "shared" }}
{{- range $store := list "postgres" "redis" }}
{{- $e := get $st $store }}
# {{ $store }} ({{ $e.mode }})
- ports:
    - {port: {{ int $e.port }}, protocol: TCP}
  {{- if eq $e.mode "bundled" }}
  to:
    - podSelector:
        matchLabels:
          {{- include "cbec.selectorLabels" (dict "root" $root "name" $store) | nindent 10 }}
  {{- else }}
  {{- with (get $root.Values.state $store).external.egressTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
{{- end }}
{{- end }}
{{- with $np.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The port of tracing.otlpEndpoint (OTLP/gRPC's 4317 when the URL names none).
*/}}
{{- define "cbec.tracingPort" -}}
{{- $host := (urlParse .Values.tracing.otlpEndpoint).host -}}
{{- $port := regexFind ":[0-9]+$" $host | trimPrefix ":" -}}
{{- $port | default "4317" -}}
{{- end -}}
