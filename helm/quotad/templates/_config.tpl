{{/*
quotad.toml, rendered from .Values.config plus what the chart decides (listeners, log format,
store and its data dir, TLS files).

Helm's own toToml is not used: Helm reads every number in a values file as a float, and toToml
writes 500000000 as 5e+08, which quotad (integer fields) rejects. "quotad.toml.table" writes
whole numbers as integers.
*/}}

{{/* A TOML key: bare when it may be, quoted otherwise (e.g. "gpt-5.5"). */}}
{{- define "quotad.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{/* A TOML value: string, boolean, integer, float, array or inline table. */}}
{{- define "quotad.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- ternary "true" "false" $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq (float64 $v) (float64 (int64 $v)) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) (kindIs "uint32" $v) -}}
{{- $v -}}
{{- else if kindIs "slice" $v -}}
[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "quotad.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" $v -}}
{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ include "quotad.toml.key" $k }} = {{ include "quotad.toml.value" (index $v $k) }}{{ end }} }
{{- else -}}
{{- fail (printf "quotad: config holds a %s, which TOML cannot represent (a null?)" (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/* A TOML table and its subtables: (list "dotted.name" MAP); "" for the top level. */}}
{{- define "quotad.toml.table" -}}
{{- $prefix := index . 0 -}}
{{- $table := index . 1 -}}
{{- range $k, $v := $table }}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) }}
{{ include "quotad.toml.key" $k }} = {{ include "quotad.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := $table }}
{{- if kindIs "map" $v }}
{{- $name := include "quotad.toml.key" $k }}
{{- if $prefix }}{{ $name = printf "%s.%s" $prefix $name }}{{ end }}

[{{ $name }}]
{{- include "quotad.toml.table" (list $name $v) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* quotad.toml: values.config overlaid with what the chart manages. */}}
{{- define "quotad.configToml" -}}
{{- include "quotad.configRender" (list . false) -}}
{{- end -}}

{{/*
What quotad reads only when it starts: quotad.toml without the settings it reloads from the
mounted file while running (see "quotad.reloadable"). The pods' checksum annotation is the
sha256 of this, so that a change to prices or plans reaches the running pods through the
ConfigMap and only a change that needs a restart rolls them. A key not listed as reloadable,
including one this chart does not know yet, counts as needing a restart.
*/}}
{{- define "quotad.restartConfigToml" -}}
{{- include "quotad.configRender" (list . true) -}}
{{- end -}}

{{/* The top-level keys quotad reloads while running (quotad's reload::RELOADABLE; a test holds
the two equal). */}}
{{- define "quotad.reloadable" -}}default_plan plans products limits top_up pricing rls shadow{{- end -}}

{{/* The config rendered as TOML: (list CONTEXT RESTART-ONLY). */}}
{{- define "quotad.configRender" -}}
{{- $root := index . 0 -}}
{{- $restartOnly := index . 1 -}}
{{- with $root -}}
{{- $v := .Values -}}
{{- $config := deepCopy ($v.config | default dict) -}}
{{- $_ := set $config "listen" (printf "0.0.0.0:%d" (int $v.ports.grpc)) -}}
{{- $_ := set $config "http_listen" (printf "0.0.0.0:%d" (int $v.ports.http)) -}}
{{- if $v.admin.separatePort -}}
{{- $_ := set $config "admin_listen" (printf "0.0.0.0:%d" (int $v.ports.admin)) -}}
{{- end -}}
{{- $_ := set $config "log_format" "json" -}}
{{- $_ := set $config "shutdown_grace_seconds" (int $v.shutdownGraceSeconds) -}}
{{- $store := $config.store | default dict -}}
{{- $kind := include "quotad.storeKind" . -}}
{{- $_ := set $store "kind" $kind -}}
{{- if eq $kind "redis" -}}
{{- $redis := $store.redis | default dict -}}
{{- if $v.redis.clusterNodes -}}
{{- $_ := set $redis "cluster_nodes" $v.redis.clusterNodes -}}
{{- else -}}
{{- $_ := set $redis "url" (include "quotad.redisUrl" .) -}}
{{- end -}}
{{- $_ := set $store "redis" $redis -}}
{{- end -}}
{{- if include "quotad.persistent" . -}}
{{- /* The embedded store writes every acknowledged change here and reloads it at start. */ -}}
{{- $_ := set $store "data_dir" $v.persistence.mountPath -}}
{{- end -}}
{{- $_ := set $config "store" $store -}}
{{- if $v.tls.enabled -}}
{{- $tls := dict "cert_file" "/etc/quotad/tls/tls.crt" "key_file" "/etc/quotad/tls/tls.key" -}}
{{- if $v.tls.clientAuth -}}
{{- $_ := set $tls "client_ca_file" "/etc/quotad/tls/ca.crt" -}}
{{- end -}}
{{- /* On Redis, replicas forward calls to the account's owner over TLS: the replicas' certificates are
     checked against ca.crt under the Service's name (pod IPs are not in them). */ -}}
{{- $_ := set $tls "peer_ca_file" "/etc/quotad/tls/ca.crt" -}}
{{- $_ := set $tls "peer_server_name" (printf "%s.%s.svc" (include "quotad.fullname" .) .Release.Namespace) -}}
{{- $_ := set $config "tls" $tls -}}
{{- end -}}
{{- if $restartOnly -}}
{{- range $key := splitList " " (include "quotad.reloadable" .) -}}
{{- $_ := unset $config $key -}}
{{- end -}}
{{- end -}}
# quotad.toml, rendered by the quotad Helm chart. Secrets come from the environment, never from
# this file.
{{- include "quotad.toml.table" (list "" $config) }}
{{ end -}}
{{- end -}}
