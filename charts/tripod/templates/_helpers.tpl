{{/* Full name of the release's objects: "tripod" for a release named tripod. */}}
{{- define "tripod.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tripod.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tripod.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tripod.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "tripod.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tripod.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tripod
{{- end -}}

{{- define "tripod.serviceAccountName" -}}
{{- default (include "tripod.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "tripod.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "tripod.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "tripod.tag" .) -}}
{{- end -}}

{{- define "tripod.agentImage" -}}
{{- default (include "tripod.builddImage" .) .Values.agentImage -}}
{{- end -}}

{{- define "tripod.builddImage" -}}
{{- default (printf "ghcr.io/tripod-build/tripod-buildd:%s" (include "tripod.tag" .)) .Values.builddImage -}}
{{- end -}}

{{- define "tripod.windowsBuilddImage" -}}
{{- default (printf "ghcr.io/tripod-build/tripod-buildd-windows:%s" (include "tripod.tag" .)) .Values.windowsBuilddImage -}}
{{- end -}}
