{{/*
Service-to-service authentication: the workloads' TLS certificates (mutual TLS) and the internal token.
Helpers only; the Secrets and Certificates are in tls.yaml, the mounts and env in deployment.yaml and
cbec.env.
*/}}

{{/* Where a serving pod finds the internal token (the Secret's key, mounted as the file `token`). */}}
{{- define "cbec.internalTokenDir" -}}/etc/cbec/internal-token{{- end -}}

{{- define "cbec.internalTokenSecretName" -}}
{{- .Values.auth.internalToken.existingSecret | default (printf "%s-internal-token" (include "cbec.fullname" .)) -}}
{{- end -}}

{{/* The Secret with the chart's CA (generated mode). */}}
{{- define "cbec.tlsCASecretName" -}}
{{- printf "%s-tls-ca" (include "cbec.fullname" .) -}}
{{- end -}}

{{/* The Secret holding a workload's certificate: (dict "root" $ "name" $name). */}}
{{- define "cbec.tlsSecretName" -}}
{{- $existing := .root.Values.tls.existingSecrets | default dict -}}
{{- get $existing .name | default (printf "%s-tls" (include "cbec.componentName" .)) -}}
{{- end -}}

{{/* The DNS names of a workload's Service, which its certificate carries, as a YAML list: (dict "root" $ "name" $name). */}}
{{- define "cbec.tlsDnsNames" -}}
{{- $svc := include "cbec.componentName" . -}}
{{- $ns := .root.Release.Namespace -}}
{{- toYaml (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .root.Values.clusterDomain)) -}}
{{- end -}}

{{/* Whether a workload's gRPC port serves mutual TLS: every service, not the gateway (its ports are the public API). */}}
{{- define "cbec.tlsServes" -}}
{{- if and .root.Values.tls.enabled (ne .name "gateway") -}}true{{- end -}}
{{- end -}}

{{/* Whether a workload calls other services of the release (cbec.upstreams). (dict "name" $name "services" $services) */}}
{{- define "cbec.callsServices" -}}
{{- if include "cbec.upstreams" . | fromYamlArray -}}true{{- end -}}
{{- end -}}

{{/* Where each enabled workload's certificate comes from, as YAML: name -> existing | certManager | generated. */}}
{{- define "cbec.tlsSources" -}}
{{- $t := .Values.tls -}}
{{- $existing := $t.existingSecrets | default dict -}}
{{- $out := dict -}}
{{- range $name, $_ := (include "cbec.services" . | fromYaml) -}}
{{- $source := "generated" -}}
{{- if hasKey $existing $name -}}
{{- $source = "existing" -}}
{{- else if $t.certManager.enabled -}}
{{- $source = "certManager" -}}
{{- end -}}
{{- $_ := set $out $name $source -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
The generated CA and certificates, as YAML: {ca: {name, data}, certs: {<workload>: {secretName, data,
notAfter, dnsNames}}}; empty unless some workload's source is `generated`. Made once per render (kept on
the root context, so the Secrets and the pods' checksums see the same certificates) and read back from
the cluster on upgrades: the CA is reused from its Secret, a workload certificate is kept while it
was signed by that CA, has the same names and more than renewBeforeDays left.
*/}}
{{- define "cbec.tlsGenerated" -}}
{{- $root := . -}}
{{- if not (hasKey $root "cbecTLSGenerated") -}}
{{- $t := $root.Values.tls -}}
{{- $out := dict -}}
{{- $wanted := list -}}
{{- if $t.enabled -}}
{{- range $name, $source := (include "cbec.tlsSources" $root | fromYaml) -}}
{{- if eq $source "generated" -}}{{- $wanted = append $wanted $name -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if $wanted -}}
{{- $ns := $root.Release.Namespace -}}
{{- $caName := include "cbec.tlsCASecretName" $root -}}
{{- $caData := (lookup "v1" "Secret" $ns $caName | default dict).data | default dict -}}
{{- $ca := dict -}}
{{- if and (get $caData "tls.crt") (get $caData "tls.key") -}}
{{- $ca = buildCustomCert (get $caData "tls.crt") (get $caData "tls.key") -}}
{{- else -}}
{{- $ca = genCAWithKey (printf "%s-ca" (include "cbec.fullname" $root)) (int $t.generated.caValidityDays) (genPrivateKey "ecdsa") -}}
{{- end -}}
{{- $caB64 := b64enc $ca.Cert -}}
{{- $_ := set $out "ca" (dict "name" $caName "data" (dict "tls.crt" $caB64 "tls.key" (b64enc $ca.Key))) -}}
{{- $now := now | unixEpoch | int64 -}}
{{- $certs := dict -}}
{{- range $name := $wanted -}}
{{- $ctx := dict "root" $root "name" $name -}}
{{- $secretName := include "cbec.tlsSecretName" $ctx -}}
{{- $names := include "cbec.tlsDnsNames" $ctx | fromYamlArray -}}
{{- $joined := join "," $names -}}
{{- $existing := lookup "v1" "Secret" $ns $secretName | default dict -}}
{{- $data := $existing.data | default dict -}}
{{- $annotations := ($existing.metadata | default dict).annotations | default dict -}}
{{- $notAfter := get $annotations "cbec.ai/tls-not-after" -}}
{{- $keep := false -}}
{{- if and (get $data "tls.crt") (get $data "tls.key") (eq (get $data "ca.crt") $caB64) (eq (get $annotations "cbec.ai/tls-dns-names") $joined) $notAfter -}}
{{- $left := sub (toDate "2006-01-02T15:04:05Z07:00" $notAfter | unixEpoch | int64) $now -}}
{{- $keep = gt $left (mul (int64 $t.generated.renewBeforeDays) 86400) -}}
{{- end -}}
{{- if not $keep -}}
{{- $days := int $t.generated.validityDays -}}
{{- $cert := genSignedCertWithKey (first $names) nil $names $days $ca (genPrivateKey "ecdsa") -}}
{{- $data = dict "tls.crt" (b64enc $cert.Cert) "tls.key" (b64enc $cert.Key) "ca.crt" $caB64 -}}
{{- $notAfter = dateInZone "2006-01-02T15:04:05Z07:00" (now | dateModify (printf "+%dh" (mul $days 24))) "UTC" -}}
{{- end -}}
{{- $_ := set $certs $name (dict "secretName" $secretName "data" $data "notAfter" $notAfter "dnsNames" $joined) -}}
{{- end -}}
{{- $_ := set $out "certs" $certs -}}
{{- end -}}
{{- $_ := set $root "cbecTLSGenerated" $out -}}
{{- end -}}
{{- toYaml (get $root "cbecTLSGenerated") -}}
{{- end -}}

{{/* The chart's internal token, base64 (empty with auth.internalToken.existingSecret): random once, then read back from the cluster. */}}
{{- define "cbec.internalTokenData" -}}
{{- $root := . -}}
{{- if not (hasKey $root "cbecInternalToken") -}}
{{- $value := "" -}}
{{- if not $root.Values.auth.internalToken.existingSecret -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "cbec.internalTokenSecretName" $root) | default dict -}}
{{- $value = get ($existing.data | default dict) $root.Values.auth.internalToken.key | default (randAlphaNum 48 | b64enc) -}}
{{- end -}}
{{- $_ := set $root "cbecInternalToken" $value -}}
{{- end -}}
{{- get $root "cbecInternalToken" -}}
{{- end -}}

{{/*
A checksum of the credentials a workload's pods read at start (generated certificate, generated token),
as a pod annotation value: a re-issued certificate or a new token rolls the pods. (dict "root" $ "name" $name)
*/}}
{{- define "cbec.credentialsChecksum" -}}
{{- $gen := include "cbec.tlsGenerated" .root | fromYaml -}}
{{- $cert := get ($gen.certs | default dict) .name | default dict -}}
{{- printf "%s/%s" (toJson ($cert.data | default dict)) (include "cbec.internalTokenData" .root) | sha256sum -}}
{{- end -}}

{{/* The pod volumes for the certificate and the token: (dict "root" $ "name" $name). */}}
{{- define "cbec.credentialVolumes" -}}
{{- $root := .root -}}
{{- if $root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "cbec.tlsSecretName" . }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
- name: internal-token
  secret:
    secretName: {{ include "cbec.internalTokenSecretName" $root }}
    defaultMode: 0440
    items:
      - {key: {{ $root.Values.auth.internalToken.key }}, path: token}
{{- end -}}

{{- define "cbec.credentialMounts" -}}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: {{ .Values.tls.mountPath }}, readOnly: true}
{{- end }}
- {name: internal-token, mountPath: {{ include "cbec.internalTokenDir" . }}, readOnly: true}
{{- end -}}

{{/*
A serving container's probe action and timeout (YAML keys of a probe): the kubelet's native gRPC probe,
or, where the port demands a client certificate (which that probe cannot present), an exec of the
runtime's health client with the pod's own certificate. (dict "root" $ "name" $name "svc" $s)
*/}}
{{- define "cbec.probeAction" -}}
{{- $root := .root -}}
{{- $s := .svc -}}
{{- $timeout := int $s.probes.timeoutSeconds -}}
{{- if include "cbec.tlsServes" . -}}
{{- $dir := $root.Values.tls.mountPath -}}
{{- $fqdn := last (include "cbec.tlsDnsNames" . | fromYamlArray) -}}
exec:
  command:
    - python
    - -m
    - services.runtime.probe
    - {{ printf "127.0.0.1:%v" $s.grpcPort | quote }}
    - --timeout
    - {{ $timeout | quote }}
    - --tls-ca
    - {{ printf "%s/ca.crt" $dir }}
    - --tls-cert
    - {{ printf "%s/tls.crt" $dir }}
    - --tls-key
    - {{ printf "%s/tls.key" $dir }}
    - --tls-server-name
    - {{ $fqdn }}
timeoutSeconds: {{ add $timeout 3 }}
{{- else -}}
grpc: {port: {{ $s.grpcPort }}}
timeoutSeconds: {{ $timeout }}
{{- end -}}
{{- end -}}

{{/* Refuse TLS and token settings that cannot work. Renders nothing. */}}
{{- define "cbec.validateAuth" -}}
{{- $root := . -}}
{{- $t := .Values.tls -}}
{{- $services := include "cbec.services" . | fromYaml -}}
{{- $tokenDir := include "cbec.internalTokenDir" . -}}
{{- if $t.enabled -}}
{{- range $name, $_ := ($t.existingSecrets | default dict) -}}
{{- if not (hasKey $services $name) -}}
{{- fail (printf "tls.existingSecrets.%s: there is no enabled service %s (services: %s)" $name $name (keys $services | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
{{- $sources := include "cbec.tlsSources" . | fromYaml -}}
{{- $bySource := dict -}}
{{- range $name, $source := $sources -}}
{{- $_ := set $bySource $source (append (get $bySource $source | default list) $name) -}}
{{- end -}}
{{- if and (hasKey $bySource "existing") (hasKey $bySource "generated") -}}
{{- fail (printf "tls.existingSecrets names %s but not %s: the chart's generated CA would sign those and your CA the others, and neither would trust the other. Name every workload in tls.existingSecrets, or enable tls.certManager for the rest" (get $bySource "existing" | sortAlpha | join ", ") (get $bySource "generated" | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if and (hasKey $bySource "certManager") (not $t.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (a CA Issuer or ClusterIssuer that signs every workload's certificate)" -}}
{{- end -}}
{{- end -}}
{{- $taken := list $tokenDir -}}
{{- if $t.enabled -}}{{- $taken = append $taken (trimSuffix "/" $t.mountPath) -}}{{- end -}}
{{- range $name, $s := $services -}}
{{- range $m := $s.secretMounts -}}
{{- $path := trimSuffix "/" $m.mountPath -}}
{{- range $dir := $taken -}}
{{- if or (eq $path $dir) (hasPrefix (printf "%s/" $dir) $path) (hasPrefix (printf "%s/" $path) $dir) -}}
{{- fail (printf "services.%s.secretMounts %s: mountPath %s overlaps %s, where the chart mounts the service's TLS certificate (tls.mountPath) or the internal token" $name $m.name $m.mountPath $dir) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
