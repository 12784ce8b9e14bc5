{{/* The release's name prefix for everything this chart makes. */}}
{{- define "tao.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tao.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tao.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The claim holding the shared home: the user's own, or the one this chart makes. */}}
{{- define "tao.homeClaim" -}}
{{- .Values.home.existingClaim | default (printf "%s-home" (include "tao.fullname" .)) -}}
{{- end -}}

{{- define "tao.settingsConfigMap" -}}
{{- printf "%s-settings" (include "tao.fullname" .) -}}
{{- end -}}
