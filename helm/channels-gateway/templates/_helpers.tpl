{{/* Names and labels, as `helm create` writes them. */}}

{{- define "channels-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "channels-gateway.fullname" -}}
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

{{- define "channels-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "channels-gateway.labels" -}}
helm.sh/chart: {{ include "channels-gateway.chart" . }}
{{ include "channels-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "channels-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "channels-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "channels-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "channels-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Seconds from "terminating" to SIGKILL: the preStop sleep, the drain, then a margin. */}}
{{- define "channels-gateway.terminationGrace" -}}
{{- add .Values.preStopSleepSeconds (ceil .Values.gateway.shutdownGraceSeconds) 15 }}
{{- end }}
