{{/*
Expand the name of the chart.
*/}}
{{- define "slimserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A default fully qualified app name, at most 63 characters (DNS label).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "slimserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "slimserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slimserve.labels" -}}
helm.sh/chart: {{ include "slimserve.chart" . }}
{{ include "slimserve.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "slimserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slimserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "slimserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "slimserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference; the GPU build is tagged "<appVersion>-gpu".
*/}}
{{- define "slimserve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-gpu" "" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
Seconds Kubernetes waits after the preStop hook starts before SIGKILL: the preStop sleep,
the server's drain timeout (SLIMSERVE_DRAIN_TIMEOUT_S) and a margin.
*/}}
{{- define "slimserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.server.preStopSleepSeconds) (int .Values.server.drainTimeoutSeconds) (int .Values.server.terminationMarginSeconds) }}
{{- end }}

{{- define "slimserve.claimName" -}}
{{- .Values.modelRepository.pvc.existingClaim | default (printf "%s-models" (include "slimserve.fullname" .)) }}
{{- end }}

{{/*
At least two replicas always run: only then can a PodDisruptionBudget keep one up without
blocking node drains.
*/}}
{{- define "slimserve.multiReplica" -}}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) 1 }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}
