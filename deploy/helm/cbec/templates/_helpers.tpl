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
