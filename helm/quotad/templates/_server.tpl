{{/*
The standalone server's pod template, shared by the Deployment (Redis, or the embedded store
without persistence) and the StatefulSet (the embedded store on a volume).
Takes (dict "ctx" $ "persistent" BOOL); persistent mounts the data volume, and with
persistence.existingClaim names that claim among the pod's volumes (otherwise the StatefulSet's
volumeClaimTemplates provide it).
*/}}
{{- define "quotad.serverPodTemplate" -}}
{{- $persistent := .persistent -}}
{{- with .ctx -}}
metadata:
  annotations:
    {{- include "quotad.checksumAnnotations" (list . "config") | nindent 4 }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "quotad.labels" . | nindent 4 }}
    app.kubernetes.io/component: server
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "quotad.serviceAccountName" . }}
  automountServiceAccountToken: false
  # Kubernetes would otherwise inject QUOTAD_PORT and friends for a Service named quotad.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ add .Values.shutdownGraceSeconds .Values.preStopSleepSeconds 10 }}
  securityContext:
    {{- include "quotad.podSecurityContext" . | nindent 4 }}
    {{- if $persistent }}
    # fsGroup makes the data volume writable by uid 65532; only re-own it when its root is not
    # already the group's, so that a large store does not slow every start.
    fsGroupChangePolicy: OnRootMismatch
    {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    {{- include "quotad.container" (dict "ctx" . "portPrefix" "" "native" false "persistent" $persistent) | nindent 4 }}
  volumes:
    {{- include "quotad.volumes" . | nindent 4 }}
    {{- if and $persistent .Values.persistence.existingClaim }}
    - name: quotad-data
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim }}
    {{- end }}
{{- end -}}
{{- end -}}
