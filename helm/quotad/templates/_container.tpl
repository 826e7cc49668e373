{{/*
The quotad container, shared by the standalone Deployment or StatefulSet and the sidecar
templates. Takes (dict "ctx" CONTEXT "portPrefix" "" "native" false "persistent" false), CONTEXT
as in "quotad.resolve"; persistent mounts the volume quotad-data at persistence.mountPath (the
embedded store's data dir, which only the StatefulSet has).
*/}}
{{- define "quotad.container" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $prefix := .portPrefix -}}
{{- $storeKind := include "quotad.storeKind" $ctx -}}
- name: quotad
  image: {{ include "quotad.image" $ctx | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if .native }}
  restartPolicy: Always
  {{- end }}
  args:
    - serve
  ports:
    - name: {{ $prefix }}grpc
      containerPort: {{ $v.ports.grpc }}
      protocol: TCP
    - name: {{ $prefix }}http
      containerPort: {{ $v.ports.http }}
      protocol: TCP
    {{- if $v.admin.separatePort }}
    - name: {{ $prefix }}admin
      containerPort: {{ $v.ports.admin }}
      protocol: TCP
    {{- end }}
  env:
    - name: QUOTAD_CONFIG
      value: /etc/quotad/config/quotad.toml
    # The same addresses as in quotad.toml, so that the image's defaults cannot override it.
    - name: QUOTAD_LISTEN
      value: {{ printf "0.0.0.0:%d" (int $v.ports.grpc) | quote }}
    - name: QUOTAD_HTTP_LISTEN
      value: {{ printf "0.0.0.0:%d" (int $v.ports.http) | quote }}
    {{- if $v.admin.separatePort }}
    - name: QUOTAD_ADMIN_LISTEN
      value: {{ printf "0.0.0.0:%d" (int $v.ports.admin) | quote }}
    {{- end }}
    - name: QUOTAD_LOG_FORMAT
      value: json
    {{- if eq $storeKind "redis" }}
    # On Redis, replicas forward calls to the replica that owns the account, at its pod IP.
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: QUOTAD_STORE__REDIS__ADVERTISE_ADDR
      value: {{ printf "$(POD_IP):%d" (int $v.ports.grpc) | quote }}
    # The outage journal and replica id: kept across container restarts, so a quotad
    # that crashed during a Redis outage writes what it journaled when it comes back.
    - name: QUOTAD_STORE__REDIS__JOURNAL_DIR
      value: /var/lib/quotad-journal
    {{- end }}
    {{- range $entry := list (list "adminToken" "QUOTAD_ADMIN_TOKEN") (list "quotaToken" "QUOTAD_QUOTA_TOKEN") (list "paymentsToken" "QUOTAD_PAYMENTS_TOKEN") (list "paymentsHmacSecret" "QUOTAD_PAYMENTS_HMAC_SECRET") (list "notificationsHmacSecret" "QUOTAD_NOTIFICATIONS_HMAC_SECRET") (list "accountTokenKeys" "QUOTAD_ACCOUNT_TOKEN_KEYS") }}
    {{- $s := index $v.secrets (index $entry 0) }}
    {{- if or $s.existingSecret $s.value }}
    - name: {{ index $entry 1 }}
      valueFrom:
        secretKeyRef:
          name: {{ default (include "quotad.secretName" $ctx) $s.existingSecret }}
          key: {{ $s.key }}
    {{- end }}
    {{- end }}
    {{- $pw := $v.redis.password }}
    {{- if and (eq $storeKind "redis") (or $pw.existingSecret $pw.value) }}
    - name: QUOTAD_REDIS_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ default (include "quotad.secretName" $ctx) $pw.existingSecret }}
          key: {{ $pw.key }}
    {{- end }}
    {{- if $v.otel.endpoint }}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ $v.otel.endpoint | quote }}
    - name: OTEL_SERVICE_NAME
      value: {{ default (include "quotad.fullname" $ctx) $v.otel.serviceName | quote }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if $v.tls.enabled }}
  {{- /* The kubelet cannot present a client certificate: probe the plain HTTP port. */}}
  {{- if $v.probes.startup.enabled }}
  startupProbe:
    httpGet:
      path: /healthz
      port: {{ $v.ports.http }}
    periodSeconds: {{ $v.probes.startup.periodSeconds }}
    failureThreshold: {{ $v.probes.startup.failureThreshold }}
  {{- end }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $v.ports.http }}
    periodSeconds: {{ $v.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ $v.probes.readiness.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $v.ports.http }}
    periodSeconds: {{ $v.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ $v.probes.liveness.failureThreshold }}
  {{- else }}
  {{- /* grpc.health.v1 Check for service "" on the gRPC port. */}}
  {{- if $v.probes.startup.enabled }}
  startupProbe:
    grpc:
      port: {{ $v.ports.grpc }}
    periodSeconds: {{ $v.probes.startup.periodSeconds }}
    failureThreshold: {{ $v.probes.startup.failureThreshold }}
  {{- end }}
  readinessProbe:
    grpc:
      port: {{ $v.ports.grpc }}
    periodSeconds: {{ $v.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ $v.probes.readiness.failureThreshold }}
  livenessProbe:
    grpc:
      port: {{ $v.ports.grpc }}
    periodSeconds: {{ $v.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ $v.probes.liveness.failureThreshold }}
  {{- end }}
  {{- if gt (int $v.preStopSleepSeconds) 0 }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ $v.preStopSleepSeconds }}
  {{- end }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- include "quotad.containerSecurityContext" $ctx | nindent 4 }}
  volumeMounts:
    # The whole ConfigMap as a directory, not a subPath: the kubelet then updates the file when
    # the ConfigMap changes, and quotad reloads what it can without a restart.
    - name: quotad-config
      mountPath: /etc/quotad/config
      readOnly: true
    {{- if $v.tls.enabled }}
    - name: quotad-tls
      mountPath: /etc/quotad/tls
      readOnly: true
    {{- end }}
    - name: quotad-tmp
      mountPath: /tmp
    {{- if eq $storeKind "redis" }}
    - name: quotad-journal
      mountPath: /var/lib/quotad-journal
    {{- end }}
    {{- if .persistent }}
    # store.data_dir: writable although the root filesystem is read-only.
    - name: quotad-data
      mountPath: {{ $v.persistence.mountPath }}
    {{- end }}
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The volumes the quotad container mounts; takes a context as in "quotad.resolve". */}}
{{- define "quotad.volumes" -}}
{{- $v := .Values -}}
- name: quotad-config
  configMap:
    name: {{ include "quotad.configMapName" . }}
{{- if $v.tls.enabled }}
- name: quotad-tls
  secret:
    secretName: {{ $v.tls.secretName }}
{{- end }}
- name: quotad-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- if eq (include "quotad.storeKind" .) "redis" }}
# One journal per pod (quotad locks it); an emptyDir outlives a container restart, not the pod.
- name: quotad-journal
  emptyDir:
    sizeLimit: 512Mi
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Data of the Secret the chart creates from values (empty when every secret is external). */}}
{{- define "quotad.secretData" -}}
{{- $v := .Values -}}
{{- $data := dict -}}
{{- $refs := dict "redis.password" $v.redis.password -}}
{{- range $name, $s := $v.secrets -}}
{{- $_ := set $refs (printf "secrets.%s" $name) $s -}}
{{- end -}}
{{- range $name, $s := $refs -}}
{{- if and $s.value (not $s.existingSecret) -}}
{{- if hasKey $data $s.key -}}
{{- fail (printf "quotad: %s uses key %q of the chart's Secret, which another value already uses: give it another key" $name $s.key) -}}
{{- end -}}
{{- $_ := set $data $s.key ($s.value | toString | b64enc) -}}
{{- end -}}
{{- end -}}
{{- if $data -}}{{ toYaml $data }}{{- end -}}
{{- end -}}

{{/* Pod annotations that roll the pods when a setting quotad reads only at start, or the
chart's Secret, changes (what quotad reloads while running reaches the pods through the mounted
ConfigMap instead): (list CONTEXT "annotation-prefix"). */}}
{{- define "quotad.checksumAnnotations" -}}
{{- $ctx := index . 0 -}}
{{- $name := index . 1 -}}
checksum/{{ $name }}: {{ include "quotad.restartConfigToml" $ctx | sha256sum }}
{{- $secret := include "quotad.secretData" $ctx }}
{{- if $secret }}
checksum/{{ $name }}-secret: {{ $secret | sha256sum }}
{{- end }}
{{- end -}}

{{/*
==== Public templates for a frontend's chart (see README.md, "Sidecar mode") ====

quotad.sidecarContainer: the quotad container, as one item of a containers list (or of
initContainers when sidecar.native is true). Call with the parent chart's root context:
    containers:
      - name: frontend
        ...
      {{- include "quotad.sidecarContainer" . | nindent 6 }}
*/}}
{{- define "quotad.sidecarContainer" -}}
{{- $ctx := dict -}}
{{- include "quotad.resolve" (list . $ctx) -}}
{{- include "quotad.checks" $ctx -}}
{{- include "quotad.container" (dict "ctx" $ctx "portPrefix" "quotad-" "native" $ctx.Values.sidecar.native "persistent" false) }}
{{- end -}}

{{/* quotad.sidecarVolumes: the volumes the sidecar mounts, as items of the pod's volumes list. */}}
{{- define "quotad.sidecarVolumes" -}}
{{- $ctx := dict -}}
{{- include "quotad.resolve" (list . $ctx) -}}
{{- include "quotad.volumes" $ctx }}
{{- end -}}

{{/* quotad.sidecarAnnotations: pod annotations that roll the frontend's pods when quotad's
config or Secret changes (checksum/quotad-config, checksum/quotad-config-secret). */}}
{{- define "quotad.sidecarAnnotations" -}}
{{- $ctx := dict -}}
{{- include "quotad.resolve" (list . $ctx) -}}
{{- include "quotad.checksumAnnotations" (list $ctx "quotad-config") }}
{{- end -}}

{{/* quotad.sidecarAddress: the address the frontend dials, e.g. http://127.0.0.1:50051
(https:// when tls.enabled). */}}
{{- define "quotad.sidecarAddress" -}}
{{- $ctx := dict -}}
{{- include "quotad.resolve" (list . $ctx) -}}
{{- printf "%s://127.0.0.1:%d" (ternary "https" "http" $ctx.Values.tls.enabled) (int $ctx.Values.ports.grpc) -}}
{{- end -}}
