{{/*
Helpers. Every helper here takes either this chart's root context or a context built by
"quotad.resolve" (a dict with Values and Release), so that the sidecar templates work the same
when a parent chart includes them.
*/}}

{{/* The version of quotad this chart was written for (Chart.yaml appVersion; the chart checks
keep them equal). A constant, because a parent chart's context carries the parent's Chart. */}}
{{- define "quotad.appVersion" -}}0.1.0{{- end -}}

{{/*
quotad.resolve fills a dict with Values (this chart's values) and Release from what a named
template was called with:
  - (dict "root" $ "values" .Values.ALIAS) from a parent chart (any alias);
  - a parent chart's root context: the values are read from .Values.quotad;
  - this chart's own root context (also under an alias).
Use: {{- $ctx := dict -}}{{- include "quotad.resolve" (list . $ctx) -}}
*/}}
{{- define "quotad.resolve" -}}
{{- $in := index . 0 -}}
{{- $ctx := index . 1 -}}
{{- if hasKey $in "root" -}}
{{- $_ := set $ctx "Values" (required "quotad: the dict passed to the quotad templates needs \"values\" (the quotad dependency's values, e.g. .Values.quotad)" $in.values) -}}
{{- $_ := set $ctx "Release" $in.root.Release -}}
{{- else if hasKey $in.Values "quotad" -}}
{{- $_ := set $ctx "Values" (index $in.Values "quotad") -}}
{{- $_ := set $ctx "Release" $in.Release -}}
{{- else if and (hasKey $in.Values "mode") (hasKey $in.Values "sidecar") (hasKey $in.Values "ports") -}}
{{- $_ := set $ctx "Values" $in.Values -}}
{{- $_ := set $ctx "Release" $in.Release -}}
{{- else -}}
{{- fail (printf "quotad: chart %s includes the quotad templates but has no quotad values: declare quotad as a dependency, or pass (dict \"root\" $ \"values\" .Values.ALIAS) when it has an alias" $in.Chart.Name) -}}
{{- end -}}
{{- if not (hasKey $ctx.Values "sidecar") -}}
{{- fail "quotad: the values given to the quotad templates are not the quotad chart's values" -}}
{{- end -}}
{{- end -}}

{{- define "quotad.name" -}}
{{- default "quotad" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "quotad.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "quotad" .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Names of the objects this chart creates, shortened so that suffixes still fit. */}}
{{- define "quotad.configMapName" -}}{{ include "quotad.fullname" . | trunc 56 | trimSuffix "-" }}-config{{- end -}}
{{- define "quotad.secretName" -}}{{ include "quotad.fullname" . | trunc 56 | trimSuffix "-" }}-secret{{- end -}}
{{- define "quotad.redisName" -}}{{ include "quotad.fullname" . | trunc 57 | trimSuffix "-" }}-redis{{- end -}}
{{- define "quotad.dashboardName" -}}{{ include "quotad.fullname" . | trunc 53 | trimSuffix "-" }}-dashboard{{- end -}}
{{- define "quotad.exampleName" -}}{{ include "quotad.fullname" . | trunc 46 | trimSuffix "-" }}-example-frontend{{- end -}}
{{- define "quotad.headlessName" -}}{{ include "quotad.fullname" . | trunc 54 | trimSuffix "-" }}-headless{{- end -}}

{{/* Labels of every object; needs this chart's root context. */}}
{{- define "quotad.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "quotad.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "quotad.imageTag" . | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (list $ "server"). */}}
{{- define "quotad.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "quotad.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "quotad.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "quotad.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "quotad.imageTag" -}}
{{- default (include "quotad.appVersion" .) .Values.image.tag -}}
{{- end -}}

{{- define "quotad.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (include "quotad.imageTag" .) -}}
{{- end -}}
{{- end -}}

{{/* The securityContext of every container of this chart (quotad and the example frontend). */}}
{{- define "quotad.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "quotad.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* "memory" or "redis", after checking that the Redis values make sense. */}}
{{- define "quotad.storeKind" -}}
{{- $r := .Values.redis -}}
{{- $external := or $r.url $r.clusterNodes -}}
{{- if and $r.url $r.clusterNodes -}}
{{- fail "quotad: set redis.url or redis.clusterNodes, not both" -}}
{{- end -}}
{{- if and $external $r.bundled.enabled -}}
{{- fail "quotad: use either an external Redis (redis.url / redis.clusterNodes) or the bundled one (redis.bundled.enabled), not both" -}}
{{- end -}}
{{- if and $r.url (hasPrefix "redis+sentinel://" $r.url) $r.clusterNodes -}}
{{- fail "quotad: redis.url names Sentinel, which does not go with redis.clusterNodes" -}}
{{- end -}}
{{- range $url := concat (list $r.url) $r.clusterNodes -}}
{{- if and $url (not (regexMatch "^(rediss?|redis\\+sentinel)://" $url)) -}}
{{- fail (printf "quotad: the Redis address %q must start with redis://, rediss:// or (redis.url only) redis+sentinel://" $url) -}}
{{- end -}}
{{- if regexMatch "^(rediss?|redis\\+sentinel)://[^/@]*:[^/@]*@" $url -}}
{{- fail "quotad: put the Redis password in redis.password (a Secret), not in the URL: the URL is written to a ConfigMap" -}}
{{- end -}}
{{- end -}}
{{- if or $external $r.bundled.enabled -}}redis{{- else -}}memory{{- end -}}
{{- end -}}

{{/*
"true" when quotad keeps the embedded store on a volume (store.data_dir): standalone mode, no
Redis, persistence.enabled. Empty otherwise: on Redis the state lives in Redis, and in sidecar
mode the pod (and so any volume) belongs to the frontend's chart.
*/}}
{{- define "quotad.persistent" -}}
{{- if and (eq .Values.mode "standalone") (eq (include "quotad.storeKind" .) "memory") .Values.persistence.enabled -}}true{{- end -}}
{{- end -}}

{{/* The Redis URL quotad uses (the bundled one when enabled). */}}
{{- define "quotad.redisUrl" -}}
{{- if .Values.redis.bundled.enabled -}}
{{- printf "redis://%s:6379" (include "quotad.redisName" .) -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/*
The port of a URL, or the default given: (list URL DEFAULT). An address with no explicit port
gets the scheme's usual port (443 for https, 80 for http) or DEFAULT.
*/}}
{{- define "quotad.urlPort" -}}
{{- $url := index . 0 -}}
{{- $hostport := regexReplaceAll "^[a-zA-Z][a-zA-Z0-9+.-]*://([^/@]*@)?([^/?#]*).*$" $url "${2}" -}}
{{- if regexMatch ":[0-9]+$" $hostport -}}
{{- regexFind "[0-9]+$" $hostport -}}
{{- else if hasPrefix "https://" $url -}}443
{{- else if hasPrefix "http://" $url -}}80
{{- else -}}{{ index . 1 }}
{{- end -}}
{{- end -}}

{{/* Checks that hold in every mode. */}}
{{- define "quotad.checks" -}}
{{- $kind := include "quotad.storeKind" . -}}
{{- if and (eq .Values.mode "standalone") (eq $kind "memory") -}}
{{- /* The embedded store has a single writer: one quotad process owns the state, and with a
data dir the database's lock file refuses a second process. A second replica would either
keep a state of its own (no data dir) or fail to start (same volume). */ -}}
{{- if .Values.autoscaling.enabled -}}
{{- fail "quotad: autoscaling needs Redis: without it quotad keeps its state in the embedded store, which has a single writer (one process owns it and its data dir), so it runs one replica. Set redis.url or redis.bundled.enabled, or turn autoscaling off" -}}
{{- end -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- fail (printf "quotad: replicas is %d, but the embedded store has a single writer (one quotad process owns it and its data dir), so it runs one replica. Set redis.url or redis.bundled.enabled for more, or replicas: 1" (int .Values.replicas)) -}}
{{- end -}}
{{- $pdb := .Values.podDisruptionBudget -}}
{{- $min := toString $pdb.minAvailable -}}
{{- $none := ternary (regexMatch "^0+%?$" (toString $pdb.maxUnavailable)) (not (regexMatch "^0+%?$" $min)) (eq $min "") -}}
{{- if and $pdb.enabled $none -}}
{{- fail "quotad: the podDisruptionBudget allows no disruption of the embedded store's single replica, so it would block every node drain for good. Keep maxUnavailable: 1 with minAvailable \"\", or set podDisruptionBudget.enabled: false" -}}
{{- end -}}
{{- end -}}
{{- if include "quotad.persistent" . -}}
{{- $path := .Values.persistence.mountPath -}}
{{- if or (eq $path "/") (eq $path "/tmp") (hasPrefix "/tmp/" $path) (eq $path "/etc/quotad") (hasPrefix "/etc/quotad/" $path) -}}
{{- fail (printf "quotad: persistence.mountPath %q would cover or share a directory the chart mounts itself (/tmp, /etc/quotad/config, /etc/quotad/tls): use a directory of its own, such as /var/lib/quotad" $path) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.sidecar.example.enabled (ne .Values.mode "sidecar") -}}
{{- fail "quotad: sidecar.example.enabled needs mode: sidecar" -}}
{{- end -}}
{{- if and .Values.sidecar.example.enabled (eq $kind "memory") (gt (int .Values.sidecar.example.replicas) 1) -}}
{{- fail "quotad: sidecar.example.replicas > 1 needs Redis: each pod's quotad would keep its own memory store" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "quotad: tls.enabled needs tls.secretName (a kubernetes.io/tls Secret with ca.crt)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "quotad: autoscaling.maxReplicas must not be below autoscaling.minReplicas" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not (dig "requests" "cpu" "" .Values.resources)) -}}
{{- fail "quotad: autoscaling on CPU needs resources.requests.cpu" -}}
{{- end -}}
{{- range $name, $s := .Values.secrets -}}
{{- if and $s.existingSecret $s.value -}}
{{- fail (printf "quotad: secrets.%s: give existingSecret or value, not both" $name) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.redis.password.existingSecret .Values.redis.password.value -}}
{{- fail "quotad: redis.password: give existingSecret or value, not both" -}}
{{- end -}}
{{- $payments := .Values.config.payments | default dict -}}
{{- if and (eq (toString (index $payments "provider")) "http") (not (index $payments "http_url")) -}}
{{- fail "quotad: config.payments.provider \"http\" needs config.payments.http_url" -}}
{{- end -}}
{{- end -}}
