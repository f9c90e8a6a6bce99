{{/*
Alert rule groups (Prometheus rules-file format), shared by the PrometheusRule and the rules ConfigMap.
Series carry a `service` label: the ServiceMonitor sets it from the pod's app.kubernetes.io/component
label (and honours the model_* metrics' own `service` label, which has the same value).
tests/deploy/promtool/alerts-test.yaml unit-tests every alert against this output.
*/}}
{{- define "cbec.alertAnnotations" -}}
summary: {{ .summary | quote }}
description: {{ .description | quote }}
{{- with .root.Values.monitoring.alerts.runbookBaseUrl }}
runbook_url: {{ printf "%s/%s" (trimSuffix "/" .) $.alert | quote }}
{{- end }}
{{- end -}}

{{- define "cbec.alertGroups" -}}
{{- $a := .Values.monitoring.alerts -}}
{{- $services := include "cbec.services" . | fromYaml -}}
{{- $sel := include "cbec.serviceMatcher" . -}}
{{- $user := `grpc_service!~"grpc.health.v1.Health|grpc.reflection.v1alpha.ServerReflection|grpc.reflection.v1.ServerReflection"` -}}
{{- $models := include "cbec.modelServiceNames" . | fromYamlArray -}}
groups:
  - name: cbec.calls
    rules:
      - alert: CbecHighErrorRatio
        expr: |-
          (
            sum by (namespace, service) (rate(grpc_server_handled_total{ {{- $sel }}, {{ $user }}, grpc_code=~"{{ join "|" $a.errorRatio.codes }}"}[5m]))
          /
            sum by (namespace, service) (rate(grpc_server_handled_total{ {{- $sel }}, {{ $user }}}[5m]))
          ) > {{ $a.errorRatio.threshold }}
        for: {{ $a.errorRatio.for }}
        labels:
          severity: {{ $a.errorRatio.severity }}
        annotations:
          {{- include "cbec.alertAnnotations" (dict "root" . "alert" "CbecHighErrorRatio"
                "summary" `{{ $labels.service }}: {{ $value | humanizePercentage }} of calls fail`
                "description" (printf `More than %v of {{ $labels.service }}'s calls (namespace {{ $labels.namespace }}) ended with a server-side error code (%s) over 5 minutes.` $a.errorRatio.threshold (join ", " $a.errorRatio.codes))) | nindent 10 }}
      {{- range $name, $s := $services }}
      - alert: CbecHighLatencyP99
        expr: |-
          histogram_quantile(0.99, sum by (namespace, service, le) (rate(grpc_server_handling_seconds_bucket{service="{{ $name }}", grpc_type="unary", {{ $user }}}[5m]))) > {{ $s.alerts.p99LatencySeconds }}
        for: {{ $a.latencyP99.for }}
        labels:
          severity: {{ $a.latencyP99.severity }}
          service: {{ $name }}
        annotations:
          {{- include "cbec.alertAnnotations" (dict "root" $ "alert" "CbecHighLatencyP99"
                "summary" `{{ $labels.service }}: p99 latency {{ $value | humanizeDuration }}`
                "description" (printf `The 99th percentile of {{ $labels.service }}'s unary calls (namespace {{ $labels.namespace }}) is above %vs.` $s.alerts.p99LatencySeconds)) | nindent 10 }}
      {{- end }}
      - alert: CbecRequestsRejected
        expr: |-
          sum by (namespace, service) (rate(model_queue_rejected_total{ {{- $sel }}}[5m])) > {{ $a.rejections.ratePerSecond }}
          or
          sum by (namespace, service) (rate(grpc_server_shed_total{ {{- $sel }}}[5m])) > {{ $a.rejections.ratePerSecond }}
        for: {{ $a.rejections.for }}
        labels:
          severity: {{ $a.rejections.severity }}
        annotations:
          {{- include "cbec.alertAnnotations" (dict "root" . "alert" "CbecRequestsRejected"
                "summary" `{{ $labels.service }} is refusing calls ({{ $value | humanize }}/s)`
                "description" `{{ $labels.service }} (namespace {{ $labels.namespace }}) rejects calls because its batch queue is full or it is at its concurrency limit: scale it out (cbecctl scale) or raise its limits.`) | nindent 10 }}
  - name: cbec.models
    rules:
      {{- range $name := $models }}
      {{- $s := get $services $name }}
      {{- $queue := (get ($s.env | default dict) "CBEC_BATCH_QUEUE_SIZE") | default 1024 }}
      - alert: CbecQueueSaturation
        expr: |-
          avg_over_time(model_queue_depth{service="{{ $name }}"}[2m]) / {{ $queue }} > {{ $a.queueSaturation.ratio }}
        for: {{ $a.queueSaturation.for }}
        labels:
          severity: {{ $a.queueSaturation.severity }}
          service: {{ $name }}
        annotations:
          {{- include "cbec.alertAnnotations" (dict "root" $ "alert" "CbecQueueSaturation"
                "summary" `{{ $labels.service }}/{{ $labels.model }}: batch queue {{ $value | humanizePercentage }} full`
                "description" (printf `The batch queue of model {{ $labels.model }} in {{ $labels.service }} (pod {{ $labels.pod }}) has averaged above %v of its %v slots; calls will soon be rejected.` $a.queueSaturation.ratio $queue)) | nindent 10 }}
      {{- end }}
      - alert: CbecModelNotLoaded
        expr: |-
          model_loaded{ {{- $sel }}} == 0
        for: {{ $a.modelNotLoaded.for }}
        labels:
          severity: {{ $a.modelNotLoaded.severity }}
        annotations:
          {{- include "cbec.alertAnnotations" (dict "root" . "alert" "CbecModelNotLoaded"
                "summary" `{{ $labels.service }} has no model loaded (pod {{ $labels.pod }})`
                "description" `{{ $labels.service }} in pod {{ $labels.pod }} (namespace {{ $labels.namespace }}) reports NOT_SERVING because no model version is loaded: check the model store and the pod's logs.`) | nindent 10 }}
      - alert: CbecModelLoadFailed
        expr: |-
          increase(model_load_failures_total{ {{- $sel }}}[{{ $a.modelLoadFailed.window }}]) > 0
        labels:
          severity: {{ $a.modelLoadFailed.severity }}
        annotations:
          {{- include "cbec.alertAnnotations" (dict "root" . "alert" "CbecModelLoadFailed"
                "summary" `{{ $labels.service }}: a model version failed to load (pod {{ $labels.pod }})`
                "description" (printf `{{ $labels.service }} in pod {{ $labels.pod }} failed to load a model version within %s; the previous version (if any) keeps serving.` $a.modelLoadFailed.window)) | nindent 10 }}
      - alert: CbecRiskRatesStale
        expr: |-
          risk_rates_age_seconds{ {{- $sel }}} and on (job, instance) (risk_rates_stale{ {{- $sel }}} == 1)
        for: {{ $a.riskRatesStale.for }}
        labels:
          severity: {{ $a.riskRatesStale.severity }}
        annotations:
          {{- include "cbec.alertAnnotations" (dict "root" . "alert" "CbecRiskRatesStale"
                "summary" `risk: currency rates table is {{ $value | humanizeDuration }} old (pod {{ $labels.pod }})`
                "description" `The risk service in pod {{ $labels.pod }} scores cross-border amounts with a currency-rates table older than its maximum age: refresh the rates.`) | nindent 10 }}
  - name: cbec.targets
    rules:
      - alert: CbecTargetDown
        expr: |-
          up{ {{- $sel }}} == 0
        for: {{ $a.targetDown.for }}
        labels:
          severity: {{ $a.targetDown.severity }}
        annotations:
          {{- include "cbec.alertAnnotations" (dict "root" . "alert" "CbecTargetDown"
                "summary" `{{ $labels.service }}: metrics target {{ $labels.instance }} is down`
                "description" `Prometheus cannot scrape {{ $labels.service }} at {{ $labels.instance }} (namespace {{ $labels.namespace }}): the pod is gone, crashing, or its metrics port is blocked.`) | nindent 10 }}
{{- end -}}
